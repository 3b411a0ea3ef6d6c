# Sourced by scripts/fashion.sh and scripts/fashion_long.sh (from the repository's root): the study's configuration,
# its tiny version (TINY=1: what CI runs), the ODE sampler the evaluation uses, and the helpers both scripts need.
config=configs/fashion_unet.toml
THREADS=${THREADS:-0}
TINY=${TINY:-0}
if [ "$TINY" = 1 ]; then
  # A U-Net of 4 and 8 channels, 2000 images, a few iterations of everything: what CI can afford of this study.
  tiny=(--set data.limit=2000 --set pretrain.channels=4 --set "pretrain.channel_mult=[1, 2]" --set pretrain.blocks=1
        --set pretrain.groups=2 --set pretrain.batch_size=8 --set classifier.iterations=20 --set finetune.batch_size=2
        --set finetune.num_steps=4 --set finetune.adjoint_matching.loss_early_steps=1
        --set finetune.adjoint_matching.loss_late_steps=1 --set finetune.checkpoint_every=0)
  N=${N:-3}; STEPS=${STEPS:-2}
else
  # 50 samples per class and 25 Heun steps (50 evaluations): 1000 x 100 Euler steps took ~12 min per model on
  # 2 idle cores, 12 models ~2.4 h; this took 1.6 min per model.
  tiny=()
  N=${N:-50}; STEPS=${STEPS:-25}
fi
INTEGRATOR=${INTEGRATOR:-heun}
# The samples file's name records the sampler, so changing N, STEPS or INTEGRATOR samples again.
samples=samples_n${N}_$INTEGRATOR$STEPS.csv
tilt=${TILT:-build/bin/tilt}
quiet=${TILT_QUIET:+-q}

. scripts/timed.sh   # timed DIR COMMAND...: its seconds and peak memory into DIR

# sample MODEL FILE: N samples at each of the ten classes with the flow ODE (the sampler above), the same seed for
# every model; a file already there is kept.
sample() {
  [ -f "$2" ] || $tilt sample -m "$1" --noise ode -n "$N" --steps "$STEPS" --integrator "$INTEGRATOR" --seed 1 \
    --threads "$THREADS" -o "$2"
}

# resume_or_clear DIR: a run killed after a checkpoint continues from it (resume=(--resume)); one killed before its
# first checkpoint has nothing worth keeping and starts again.
resume_or_clear() {
  resume=()
  if [ -f "$1/checkpoint.pt" ]; then resume=(--resume); else rm -rf "$1"; fi
}
