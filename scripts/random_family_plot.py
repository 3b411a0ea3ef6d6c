#!/usr/bin/env python3
"""The random family's figures: per problem (x = seed), the ODE and the SDE distance ratios of plain Adjoint Matching
(docs/random_family.md), with dsm_until = 0.5 (docs/random_family_dsm.md) and of the exact field, on a log scale.
Reads the two tables (the docs, or the summary.md of two runs) and draws with tilt's plot code (tilt_soc_curves).
Usage: scripts/random_family_plot.py [PLAIN.md DSM.md OUT_PREFIX]  (default: the docs, docs/images/random_family)"""
import json, os, re, subprocess, sys, tempfile

def rows(path):
    out = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not cells[0].isdigit():
            continue
        mean = lambda c: float(re.match(r"([0-9.]+)", c).group(1))
        out[int(cells[0])] = {"sde": mean(cells[3]), "ode": mean(cells[4]), "exact_sde": mean(cells[5]),
                              "exact_ode": mean(cells[6])}
    return out

def main(plain_md, dsm_md, prefix):
    plain, dsm = rows(plain_md), rows(dsm_md)
    seeds = sorted(set(plain) & set(dsm))
    tmp = tempfile.mkdtemp()
    for sampler, name in (("ode", "ODE (Heun, 60 steps)"), ("sde", "memoryless SDE (Euler, 60 steps)")):
        files = []
        for label, table, key in (("Adjoint Matching", plain, sampler), ("dsm_until 0.5", dsm, sampler),
                                  ("exact field", dsm, "exact_" + sampler)):
            path = os.path.join(tmp, "%s_%d.jsonl" % (sampler, len(files)))
            with open(path, "w") as f:
                for s in seeds:
                    f.write(json.dumps({"seed": s, "ratio": table[s][key]}) + "\n")
            files.append("%s=%s" % (label, path))
        subprocess.run(["build/bench/tilt_soc_curves", "-o", "%s_%s.png" % (prefix, sampler), "--title",
                        "random family, %s" % name, "--x", "seed", "--y", "ratio",
                        "--x-label", "seed (d = 2, 3, ..., 10, then 3)", "--y-label", "energy distance / floor",
                        "--log-y", "1"] + files, check=True)

if __name__ == "__main__":
    main(*(sys.argv[1:] or ["docs/random_family.md", "docs/random_family_dsm.md", "docs/images/random_family"]))
