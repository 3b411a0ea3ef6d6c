# Sourced by scripts/digits_conditional.sh (STUDY=methods) and scripts/guidance_study.sh (from the repository's
# root): both use one class-conditional digits base in runs/digits_cond, pretrained for this many iterations (not
# configs/digits_conditional.toml's 8000). Whichever script runs first makes it; the docs' tables were made on it.
digits_cond_pretrain_iterations=30000
