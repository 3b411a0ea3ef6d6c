#!/usr/bin/env python3
"""Table of scripts/unified_losses_study.sh's results: per problem, each method's SDE and ODE distance ratios (mean
+- standard error over the replicates), its training time and its field's error relative to the tilt's size at a
few times; the exact field's ratios (the samplers' own error) once per problem. With `tilt_ode_gap --grad-variance M`
(GRAD_VARIANCE=M in the study), also the variance of each method's minibatch gradient at the final parameters: the
trace of the covariance over M minibatches, and |mean|^2 / (trace / M): about 1 when the mean of the M gradients is
pure noise (the run sits at a stationary point, within the noise), >> 1 when a systematic gradient remains. A second folder (argument
2) supplies that column from other runs of the same training (same seed and budget) where the first lacks it."""
import glob, json, os, re, sys

METHODS = ["adjoint_matching", "am_dsm", "dsm", "tsm", "cmcd_kl", "cmcd_logvar", "nets"]
LABELS = {"am_dsm": "adjoint_matching, dsm_until = 0.5"}
TIMES = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)

def load(folder):
    runs = {}  # (seed, d, method); the demo is seed -1
    for f in glob.glob(os.path.join(folder, "*.json")):
        m = re.match(r"(?:seed(\d+)_d(\d+)|demo)_(.+)\.json$", os.path.basename(f))
        try:
            key = (int(m.group(1)), int(m.group(2))) if m.group(1) else (-1, 2)
            runs[key + (m.group(3),)] = json.load(open(f))
        except (OSError, ValueError, AttributeError):
            continue
    return runs

def main(folder, grad_folder=None):
    runs = load(folder)
    if grad_folder:
        for key, j in load(grad_folder).items():
            if key in runs and "gradient_variance" not in runs[key] and "gradient_variance" in j:
                runs[key]["gradient_variance"] = j["gradient_variance"]
    has_grad = any("gradient_variance" in j for j in runs.values())
    reps = next(iter(runs.values())).get("replicates", "R") if runs else "R"
    print("# The unified view's losses beside Adjoint Matching\n")
    print("Made by `scripts/unified_losses_study.sh` (`tilt_ode_gap configs/demo_2d.toml` and `tilt_ode_gap "
          "configs/random_family.toml --random SEED --dim D`, with `--set finetune.method=M`; do not edit by hand). Each method trains the same residual network with the "
          "same budget (2400 iterations of 256, lr 4e-3 cosine, K = 60) and its own defaults (docs/config.md). "
          "Distances: energy distance of 2000 samples to 2000 exact samples of p*, over the noise floor, mean +- "
          "standard error over %s independent sets, with the memoryless SDE and with the ODE (Heun), 60 steps "
          "each; `nets` learns the ODE's drift (its SDE column samples the same field with noise). Relative "
          "error: E|v_theta - v*|^2 / E|v* - v_base|^2 on x ~ p*_t (docs/equations.md, E105). Seconds: "
          "training only, one thread, on a shared 2-core machine.%s\n" % (reps, (
          " Gradient variance: tr Cov of the method's minibatch gradient (batch 256) over M independent minibatches "
          "at the final parameters (raw, in the loss's own units, so comparable only within a method), and "
          "|mean|^2 / (tr Cov / M): about 1 when the mean of the M gradients is only their noise (a stationary "
          "point within the noise), >> 1 when a systematic gradient remains (`tilt_ode_gap --grad-variance M`; - "
          "where not measured).") if has_grad else ""))
    fmt = lambda r: "%.2f ± %.2f" % (r[0], r[1])
    for seed, dim in sorted({(s, d) for s, d, _ in runs}):
        rows = [(m, runs[(seed, dim, m)]) for m in METHODS if (seed, dim, m) in runs]
        j0 = rows[0][1]
        if seed < 0:
            print("## The 2-D demo (configs/demo_2d.toml: 8 Gaussians on a ring, quadratic reward)\n")
        else:
            print("## Seed %d, d = %d, %s reward\n" % (seed, dim, j0["problem"]["reward"]))
        print("Exact field: SDE %s, ODE %s.\n" % (fmt(j0["exact_field"]["sde"]), fmt(j0["exact_field"]["ode"])))
        grad_head = " grad tr Cov | mean^2 / (tr Cov / M) |" if has_grad else ""
        print("| method | SDE / floor | ODE / floor | train s | " + " | ".join("rel. err. t=%g" % t for t in TIMES) + " |" + grad_head)
        print("|" + "---|" * (4 + len(TIMES) + (2 if has_grad else 0)))
        for m, j in rows:
            err = {round(v["t"], 2): v["relative"] for v in j["velocity_error"]}
            g = j.get("gradient_variance")
            grad = (" %.3g | %.2f |" % (g["trace_covariance"], g["minibatches"] / g["noise_to_signal"]) if g else " - | - |") if has_grad else ""
            print("| %s | %s | %s | %.0f | %s |%s" % (LABELS.get(m, m), fmt(j["model"]["sde"]), fmt(j["model"]["ode"]),
                  j["train_seconds"], " | ".join("%.3f" % err[t] for t in TIMES), grad))
        print()

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/unified_losses", sys.argv[2] if len(sys.argv) > 2 else None)
