#!/usr/bin/env python3
"""Writes docs/double_well.md from the runs of scripts/double_well_study.sh (argument: their directory).

Besides the runs' table it computes, independently of tilt (pure Python: its own finite-difference solve of
the 1-D backward equation per kind of coordinate, docs/equations.md E45, and Euler-Maruyama paths of the
optimal process), where in time the optimal control's mean square E|u*(X_t, t)|^2 lives: that is what the
control L2 error of u = 0 averages (docs/equations.md, E33)."""
import json
import math
import os
import random
import sys


def solve_control(kappa, nu, T=1.0, L=2.75, dx=0.01, N=1000, S=200):
    """dV/dx on the grid at S + 1 times, V = -log psi, psi solving d psi/dt + b psi' + 1/2 psi'' = 0."""
    n = int(round(2 * L / dx)) + 1
    x = [-L + j * dx for j in range(n)]
    U = [kappa * (xi * xi - 1) ** 2 for xi in x]
    up = [0.5 / dx / dx * math.exp(-(U[j + 1] - U[j])) if j + 1 < n else 0.0 for j in range(n)]
    dn = [0.5 / dx / dx * math.exp(-(U[j - 1] - U[j])) if j > 0 else 0.0 for j in range(n)]

    def step(psi, ds, th):
        lo, di, hi, r = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
        for j in range(n):
            G = up[j] * ((psi[j + 1] if j + 1 < n else 0) - psi[j]) + dn[j] * ((psi[j - 1] if j > 0 else 0) - psi[j])
            r[j] = psi[j] + (1 - th) * ds * G
            lo[j], hi[j], di[j] = -th * ds * dn[j], -th * ds * up[j], 1 + th * ds * (up[j] + dn[j])
        for j in range(1, n):
            m = lo[j] / di[j - 1]
            di[j] -= m * hi[j - 1]
            r[j] -= m * r[j - 1]
        y = [0.0] * n
        y[-1] = r[-1] / di[-1]
        for j in range(n - 2, -1, -1):
            y[j] = (r[j] - hi[j] * y[j + 1]) / di[j]
        return y

    def grad_v(psi):
        V = [-math.log(p) for p in psi]
        return [(V[min(j + 1, n - 1)] - V[max(j - 1, 0)]) / ((min(j + 1, n - 1) - max(j - 1, 0)) * dx) for j in range(n)]

    psi = [math.exp(-nu * (xi * xi - 1) ** 2) for xi in x]
    tables = [None] * (S + 1)
    tables[S] = grad_v(psi)
    every, ds = N // S, T / N
    for k in range(1, N + 1):
        psi = step(step(psi, ds / 2, 1), ds / 2, 1) if k == 1 else step(psi, ds, 0.5)
        if k % every == 0:
            tables[S - k // every] = grad_v(psi)
    return tables, L, dx


def u_star_profile(kappa, nu, K=200, B=2000, seed=0):
    """E|u*_i(X_k, t_k)|^2 for k < K under the optimal process (Euler-Maruyama from x = 0)."""
    tables, L, dx = solve_control(kappa, nu, S=K)
    rng = random.Random(seed)
    h = 1.0 / K
    X = [0.0] * B
    e = [0.0] * K
    for k in range(K):
        row = tables[k]
        for b in range(B):
            p = (min(max(X[b], -L), L) + L) / dx
            j = min(int(p), len(row) - 2)
            w = p - j
            u = -((1 - w) * row[j] + w * row[j + 1])
            e[k] += u * u / B
            X[b] += h * (-4 * kappa * X[b] * (X[b] ** 2 - 1) + u) + math.sqrt(h) * rng.gauss(0, 1)
    return e


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def fmt(x, spec="%.3g"):
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else spec % x


def main():
    out = sys.argv[1]
    rows = []
    for name in sorted(os.listdir(out)):
        d = os.path.join(out, name)
        if not os.path.isfile(os.path.join(d, "summary.json")):
            continue
        summary = json.load(open(os.path.join(d, "summary.json")))
        resolved = json.load(open(os.path.join(d, "soc.resolved.json")))
        r = summary["losses"]["adjoint_matching"]
        evals = [(e["iteration"], e["control_l2_error"]) for e in read_jsonl(os.path.join(d, "adjoint_matching.eval.jsonl"))]
        e0, e1 = r["initial_control_l2_error"], r["control_l2_error"]
        it = summary["iterations"]
        ms = r["ms_per_iteration"]
        wall = float(open(os.path.join(d, "wall_seconds")).read()) if os.path.isfile(os.path.join(d, "wall_seconds")) else float("nan")
        reach = {}
        for f in (2, 5, 10):
            hit = [i for i, e in evals if e <= e0 / f]
            reach[f] = hit[0] if hit else None
        # Extrapolation to 10x: log error linear in log iteration over the second half of the curve.
        extra = None
        if reach[10] is None:
            tail = [(math.log(i), math.log(e)) for i, e in evals if i >= it / 2 and i > 0]
            if len(tail) >= 3:
                mx = sum(a for a, _ in tail) / len(tail)
                my = sum(b for _, b in tail) / len(tail)
                sxx = sum((a - mx) ** 2 for a, _ in tail)
                slope = sum((a - mx) * (b - my) for a, b in tail) / sxx
                if slope < 0:
                    extra = math.exp(mx + (math.log(e0 / 10) - my) / slope)
        rows.append(dict(name=name, resolved=resolved, it=it, ms=ms, wall=wall, e0=e0, e1=e1,
                         best=min(e for _, e in evals), evals=evals, reach=reach, extra=extra))

    print("# The double well: what Adjoint Matching needs (issue 22, item 5)\n")
    print("Generated by `scripts/double_well_study.sh` (`scripts/double_well_table.py`); do not edit by hand.")
    print("Problem: `tilt soc --problem double_well` (d = 10, kappa = 5 and nu = 3 on three coordinates, 1 and 1 on")
    print("seven, x0 = 0, T = 1, 200 steps). Loss: adjoint_matching, batch 128, seed 0, one thread per run, two")
    print("runs side by side on the 2-core machine. Error: tilt's control L2 error (docs/soc.md, Metrics) on 1024")
    print("fixed evaluation paths every 100 iterations.\n")
    print("| variant | control | hidden | lr | curriculum | iterations | train s | wall s | initial L2 | final L2 | best | ratio | 2x / 5x / 10x at |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["resolved"]
        cur = "-" if o.get("curriculum_start", 1) >= 1 else "%g -> 1 over %g" % (o["curriculum_start"], o["curriculum_fraction"])
        reach = " / ".join(str(r["reach"][f]) if r["reach"][f] is not None else "-" for f in (2, 5, 10))
        print("| %s | %s | %s | %g | %s | %d | %.0f | %s | %s | %s | %s | %.2fx | %s |" % (
            r["name"], o.get("control", "mlp"), ",".join(str(h) for h in o["hidden"]), o["lr"], cur, r["it"],
            r["ms"] * r["it"] / 1e3, fmt(r["wall"], "%.0f"), fmt(r["e0"], "%.4g"), fmt(r["e1"], "%.4g"),
            fmt(r["best"], "%.4g"), r["e0"] / r["e1"], reach))
    extrapolated = [r for r in rows if r["extra"] is not None]
    if extrapolated:
        print("\nExtrapolated (not measured) iterations to 10x, from a power law fitted to the second half of each curve")
        print("that has not reached it:\n")
        print("| variant | iterations to 10x (extrapolated) | train time at its ms / iteration |")
        print("|---|---|---|")
        for r in extrapolated:
            print("| %s | %.3g | %.3g h |" % (r["name"], r["extra"], r["extra"] * r["ms"] / 3.6e6))
    print("\nError along each curve (iteration: error):\n")
    for r in rows:
        pts = [(i, e) for i, e in r["evals"] if i % 200 == 0 or i == r["it"]]
        print("- %s: %s" % (r["name"], ", ".join("%d: %.3g" % p for p in pts)))

    print("\n## Where the error of u = 0 lives\n")
    print("E|u*_i(X_t, t)|^2 under the optimal process, per kind of coordinate (an independent pure-Python solve of")
    print("the 1-D backward equation, dx = 0.01, 2000 Euler-Maruyama paths): the share of its time average that")
    print("comes from each part of [0, T]. The control L2 error of u = 0 is the sum over coordinates.\n")
    print("| kappa, nu | coordinates | time average | t < 0.5 | 0.5-0.9 | t > 0.9 | at t = 0.5 | at t = 0.9 | at the last step |")
    print("|---|---|---|---|---|---|---|---|---|")
    total = 0.0
    for kappa, nu, count in ((5.0, 3.0, 3), (1.0, 1.0, 7)):
        e = u_star_profile(kappa, nu)
        K = len(e)
        s = sum(e)
        total += count * s / K
        print("| %g, %g | %d | %.4f | %.2g | %.3f | %.3f | %.3g | %.3g | %.3g |" % (
            kappa, nu, count, s / K, sum(e[:K // 2]) / s, sum(e[K // 2:9 * K // 10]) / s, sum(e[9 * K // 10:]) / s,
            e[K // 2], e[9 * K // 10], e[-1]))
    print("\nSum over the ten coordinates: %.3f (tilt's initial error above is the same quantity on its own paths)." % total)


if __name__ == "__main__":
    main()
