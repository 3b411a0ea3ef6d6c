#!/usr/bin/env python3
"""Writes scripts/fashion_long.sh's table (markdown, on stdout) from its OUT folder: one row per stage of each run,
scored by `tilt eval-images --json` (OUT/eval.json) together with the base and the target p*.

  python3 scripts/fashion_long_table.py OUT SAMPLES LAMBDA N STEPS INTEGRATOR THREADS
"""
import json, os, re, sys

from fashion_table import fmt, seconds_per_iteration

RUNS = [("am", "Adjoint Matching (memoryless)"), ("am_sigma1", "Adjoint Matching, sigma = 1"),
        ("am_copy", "Adjoint Matching, full copy (lr 2e-4)"),
        ("am_cosine", "Adjoint Matching, lr decayed along a cosine to 1e-5"),
        ("am_batch32", "Adjoint Matching, batch 32"), ("am_k20", "Adjoint Matching, K = 20 steps (6 + 6 in the loss)"),
        ("am_k40", "Adjoint Matching, K = 40 steps (12 + 12 in the loss)"),
        ("am_exact", "Adjoint Matching on the exact step's chain (K = 10)"), ("discrete_adjoint", "discrete adjoint")]


def with_seeds(out, name, label):
    """The run of seed 0 and its other seeds (OUT/<name>_seed<N>, by N), as (folder name, row label) pairs."""
    seeds = sorted((int(m.group(1)), d) for d in (os.listdir(out) if os.path.isdir(out) else [])
                   for m in [re.fullmatch(re.escape(name) + r"_seed(\d+)", d)] if m)
    return [(name, label)] + [(d, "%s, seed %d" % (label, k)) for k, d in seeds]


def speed(run):
    """The run's median seconds per iteration and, in brackets, the threads it trained with."""
    seconds = seconds_per_iteration(run)
    if seconds is None:
        return ""
    try:
        threads = json.load(open(os.path.join(run, "config.resolved.json"))).get("threads")
    except (OSError, ValueError):
        threads = None
    if threads is None:
        return fmt(seconds, ".2f")
    return fmt(seconds, ".2f") + " (%s)" % (threads if threads else "all cores")


def main():
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    out, samples, lam, n, steps, integrator, threads = sys.argv[1:]
    e = json.load(open(os.path.join(out, "eval.json")))
    base_file = os.path.join(out, "base", samples)
    base = e["samples"][base_file]["summary"]["mean_reward"]
    target = e["target"]["summary"]["mean_reward"]

    def cells(s, way):
        u = s.get("unseen", {})
        share = fmt(100 * (s["mean_reward"] - base) / (target - base), ".0f") + "%" if way and target != base else ""
        return [fmt(s["mean_reward"], ".3f"), share, fmt(u.get("mean_reward"), ".3f", ""),
                fmt(100 * s["class_share"], ".1f") + "%", fmt(s.get("feature_diversity"), ".2f"),
                fmt(s["diversity"], ".2f"), fmt(s["frechet"], ".1f")]

    w = sys.stdout.write
    w("# Fashion-MNIST: Adjoint Matching at longer budgets (lambda = %s)\n\n" % lam)
    w("Written by `scripts/fashion_long.sh` (`UPDATE_DOCS=1`); do not edit by hand. scripts/fashion.sh's base U-Net "
      "(configs/fashion_unet.toml), fine-tuned over all ten classes towards r(x, c) = log p(c | x) at lambda = %s "
      "(batch 16, K = 10 time steps, a constant learning rate, training seed 0, where the row does not say "
      "otherwise; the base's other rows: the base sampled with the memoryless SDE in K steps, the chain a run of K "
      "steps trains on), each run trained on in stages (a run whose learning rate decays: in one) and scored at each: "
      "%s ODE samples per class (%s %s steps, sampled with THREADS=%s). Each metric is the mean over the ten "
      "classes of the class's own. \"Of the way to p*\": (log p(c|x) - the base's) / (the target's - the base's). "
      "s/it: the median seconds per iteration over the run's stages, with the run's threads in brackets (runs "
      "started side by side, one script per run, share the machine's cores). Other columns as in docs/fashion.md.\n\n"
      % (lam, n, integrator.capitalize(), steps, threads))
    w("| model | iterations | log p(c\\|x) | of the way to p\\* | unseen log p | own class | feature diversity | "
      "pixel diversity | Frechet | s/it |\n|---|---|---|---|---|---|---|---|---|---|\n")
    w("| base model | 0 | %s | |\n" % " | ".join(cells(e["samples"][base_file]["summary"], False)))
    # The base sampled with a training chain (the memoryless SDE in K steps) instead of the ODE.
    chain = re.escape(os.path.join(out, "base")) + r"/chain_(euler|exact)(\d+)_n" + re.escape(n) + r"\.csv"
    chains = sorted((m.group(1) != "euler", int(m.group(2)), path) for path in e["samples"]
                    for m in [re.fullmatch(chain, path)] if m)
    for exact, k, path in chains:
        w("| base model, sampled with the memoryless chain: %s, K = %d | 0 | %s | |\n"
          % ("the exact step" if exact else "Euler-Maruyama (as the runs train)", k,
             " | ".join(cells(e["samples"][path]["summary"], False))))
    for name, label in (run for name, label in RUNS for run in with_seeds(out, name, label)):
        pattern = re.escape(os.path.join(out, name)) + r"/(\d+)_" + re.escape(samples)
        stages = sorted((int(m.group(1)), path) for path in e["samples"]
                        for m in [re.fullmatch(pattern, path)] if m)
        for iterations, path in stages:
            w("| %s | %d | %s | %s |\n" % (label, iterations, " | ".join(cells(e["samples"][path]["summary"], True)),
                                          speed(os.path.join(out, name))))
    if "floor" in e:  # the real images at the samples' n: where the Frechet distance of a perfect sampler sits
        f = e["floor"]["summary"]
        w("| floor: real images, %d per class (what the data scores at this n) | | %s | |\n"
          % (f["n"] // f["classes"], " | ".join(cells(f, False))))
    t = e["target"]["summary"]
    w("| target p\\* (base samples reweighted by p(c\\|x)^lambda) | | %s | 100%% | | %s%% | %s | %s | %s | |\n"
      % (fmt(t["mean_reward"], ".3f"), fmt(100 * t["class_share"], ".1f"), fmt(t.get("feature_diversity"), ".2f"),
         fmt(t["diversity"], ".2f"), fmt(t["frechet"], ".1f")))


if __name__ == "__main__":
    main()
