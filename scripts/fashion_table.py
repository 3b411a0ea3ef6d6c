#!/usr/bin/env python3
"""Writes scripts/fashion.sh's tables (markdown, on stdout) from its runs folder: one table per lambda from
`tilt eval-images --json` (the mean over the ten classes of each metric), the seconds per iteration from each run's
metrics.jsonl, the peak resident memory from max_rss_kb.txt; then LoRA against a full copy, and the brightness run.

  python3 scripts/fashion_table.py --out runs/fashion --iterations 200 --n 50 --samples samples_n50_heun25.csv --steps 25 --integrator heun --threads 0 1=runs/fashion/eval_l1.json ...
"""
import argparse, csv, json, os, statistics, sys

METHODS = [  # (run name, with {l} for lambda; label)
    ("base", "base model"),
    ("am_l{l}", "Adjoint Matching (memoryless)"),
    ("am_sigma1_l{l}", "Adjoint Matching, sigma = 1"),
    ("discrete_adjoint_l{l}", "discrete adjoint"),
    ("draft1", "DRaFT-1"),
    ("refl", "ReFL"),
    ("ddpo", "DDPO"),
]


def read_text(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def seconds_per_iteration(run):
    """Median of the iterations' own seconds (metrics.jsonl), so checkpoints and start-up do not count."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    values = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "seconds" in row:
                values.append(row["seconds"])
    return statistics.median(values) if values else None


def peak_mb(run):
    kb = read_text(os.path.join(run, "max_rss_kb.txt"))
    return int(kb) // 1024 if kb else None


def mean_pixel(samples_csv):
    """The mean over samples of the mean pixel (the brightness reward), from the x columns of a samples file."""
    with open(samples_csv) as f:
        rows = csv.reader(f)
        header = next(rows)
        xs = [i for i, name in enumerate(header) if name.startswith("x")]
        total, n = 0.0, 0
        for row in rows:
            total += sum(float(row[i]) for i in xs) / len(xs)
            n += 1
    return total / n


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def summary_cells(s):
    u = s.get("unseen", {})
    return [fmt(s["mean_reward"], ".3f"), fmt(u.get("mean_reward"), ".3f"), fmt(100 * s["class_share"], ".1f") + "%",
            fmt(100 * u["class_share"], ".1f") + "%" if "class_share" in u else "-",
            fmt(s.get("feature_diversity"), ".2f"), fmt(s["diversity"], ".2f"), fmt(s["frechet"], ".1f")]


def cost_cells(run):
    return [fmt(seconds_per_iteration(run), ".2f"), fmt(peak_mb(run), "d")]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--iterations", required=True)
    p.add_argument("--n", required=True)
    p.add_argument("--samples", required=True, help="the samples file's name in each run's folder")
    p.add_argument("--steps", required=True)
    p.add_argument("--integrator", required=True)
    p.add_argument("--threads", required=True)
    p.add_argument("evals", nargs="+", help="LAMBDA=eval.json")
    a = p.parse_args()
    evals = []
    for item in a.evals:
        lam, _, path = item.partition("=")
        with open(path) as f:
            evals.append((lam, json.load(f)))

    out = sys.stdout
    out.write("# Fashion-MNIST: the Adjoint Matching paper's table in miniature\n\n")
    out.write("Written by `scripts/fashion.sh` (`UPDATE_DOCS=1`); do not edit by hand. A class-conditional U-Net "
              "(configs/fashion_unet.toml, 1.25M parameters) fine-tuned over all ten classes towards "
              "r(x, c) = log p(c | x) of a CNN classifier, with rank-4 LoRA adapters, for %s iterations of batch 16 "
              "and K = 10 steps per method; %s ODE samples per class (%s %s steps, guidance 0); THREADS=%s. Each "
              "metric is the mean over the ten classes of the class's own score. Columns: log p(c|x), the training "
              "reward; unseen, a second classifier (an MLP, another seed) never used in training; own class, the "
              "share of samples the classifier assigns to their condition; feature and pixel diversity, the mean "
              "pairwise distance among those in the classifier's features and in pixels; Frechet, each class's "
              "samples against its real images in the classifier's features; s/it, the median seconds per "
              "iteration; memory, the run's peak resident memory. DRaFT-1, ReFL and DDPO have no KL term and "
              "their lambda only scales the reward, so one run of each appears under both lambdas.\n\n"
              % (a.iterations, a.n, a.steps, a.integrator.capitalize(), a.threads))
    head = ("| method | log p(c\\|x) | unseen log p | own class | unseen own class | feature diversity | "
            "pixel diversity | Frechet | s/it | memory (MB) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for lam, e in evals:
        out.write("## lambda = %s\n\n" % lam)
        out.write(head)
        for run, label in METHODS:
            name = run.format(l=lam)
            path = os.path.join(a.out, name, a.samples)
            if path not in e["samples"]:
                continue
            cells = summary_cells(e["samples"][path]["summary"]) + (cost_cells(os.path.join(a.out, name))
                                                                       if name != "base" else ["", ""])
            out.write("| %s | %s |\n" % (label, " | ".join(cells)))
        if "target" in e:
            t = e["target"]["summary"]
            out.write("| target p\\* (base samples reweighted by p(c\\|x)^lambda) | %s | | %s | | %s | %s | %s | | |\n"
                      % (fmt(t["mean_reward"], ".3f"), fmt(100 * t["class_share"], ".1f") + "%",
                         fmt(t.get("feature_diversity"), ".2f"), fmt(t["diversity"], ".2f"), fmt(t["frechet"], ".1f")))
        r = e["real"]["summary"]
        out.write("| real images | %s | %s | %s | %s | %s | %s | %s | | |\n" % tuple(summary_cells(r)))
        if "floor" in e:  # the real images at the samples' n: where the Frechet distance of a perfect sampler sits
            f = e["floor"]["summary"]
            out.write("| floor: real images, %d per class (what the data scores at this n) | %s | | |\n"
                      % (f["n"] // f["classes"], " | ".join(summary_cells(f))))
        out.write("\n")

    lam1 = dict(evals).get("1")
    if lam1 is not None:
        rows = [("LoRA, rank 4 (lr 1e-3)", "am_l1"), ("full copy (lr 2e-4)", "am_copy_l1")]
        present = [(label, name) for label, name in rows
                   if os.path.join(a.out, name, a.samples) in lam1["samples"]]
        if present:
            out.write("## LoRA against full fine-tuning at equal budget (lambda = 1)\n\n")
            out.write(head.replace("| method |", "| Adjoint Matching, trained |"))
            for label, name in present:
                s = lam1["samples"][os.path.join(a.out, name, a.samples)]["summary"]
                out.write("| %s | %s |\n" % (label, " | ".join(summary_cells(s) + cost_cells(os.path.join(a.out, name)))))
            out.write("\n")
        bright = os.path.join(a.out, "am_bright", a.samples)
        if bright in lam1["samples"]:
            out.write("## A reward of another kind: brightness\n\n")
            out.write("Adjoint Matching towards r(x) = the mean pixel (`[reward] type = \"ink\"`, lambda = 10), scored "
                      "by the same classifiers (the classes should survive, the images get brighter).\n\n")
            out.write("| samples | mean pixel | log p(c\\|x) | own class | feature diversity | Frechet | s/it |\n"
                      "|---|---|---|---|---|---|---|\n")
            for label, name in [("base", "base"), ("Adjoint Matching, brightness", "am_bright")]:
                f = os.path.join(a.out, name, a.samples)
                s = lam1["samples"][f]["summary"]
                out.write("| %s | %.3f | %.3f | %.1f%% | %s | %.1f | %s |\n"
                          % (label, mean_pixel(f), s["mean_reward"], 100 * s["class_share"],
                             fmt(s.get("feature_diversity"), ".2f"), s["frechet"],
                             fmt(seconds_per_iteration(os.path.join(a.out, name)), ".2f") if name != "base" else ""))
            out.write("\n")


if __name__ == "__main__":
    main()
