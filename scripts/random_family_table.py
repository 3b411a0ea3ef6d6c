#!/usr/bin/env python3
"""Table of scripts/random_family.sh's results: per problem, the SDE and ODE distance ratios (mean +- standard
error over the replicates) of the fine-tuned model and of the exact field (the samplers' own error), the
fine-tuned velocity's error relative to the tilt's size at a few times; then the distribution over problems."""
import glob, json, os, statistics, sys

def main(folder):
    rows = []
    for f in glob.glob(os.path.join(folder, "seed*_d*.json")):
        try:
            rows.append(json.load(open(f)))
        except (OSError, ValueError):
            continue
    rows.sort(key=lambda j: j["problem"]["random_seed"])
    times = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    reps = rows[0].get("replicates", 20) if rows else "R"  # results before the key was written: the script's 20
    print("# Random problems, one configuration: the table\n")
    print("Made by `scripts/random_family.sh` (configs/random_family.toml, `tilt_ode_gap --random SEED --dim D`); "
          "the discussion is in docs/method.md, \"The ODE gap\". Each problem: a random anisotropic Gaussian "
          "mixture and a random linear or quadratic reward (random_tilt_problem), fine-tuned once with the same "
          "settings. Distances: energy distance of 2000 samples to 2000 exact samples of p*, over the noise floor, "
          "mean +- standard error over %s independent sets; \"exact field\" samples the exact tilted velocity "
          "with the same sampler (its own discretisation error). Relative error: E|v_theta - v*|^2 / "
          "E|v* - v_base|^2 on x ~ p*_t (docs/equations.md, E105).\n" % reps)
    sets = rows[0].get("sets", []) if rows else []
    if sets:
        print("Overrides of configs/random_family.toml (`SETS`, `--set`): %s.\n" % ", ".join("`%s`" % x for x in sets))
    steps = sorted({j["score_steps"] for j in rows if "score_steps" in j})
    if steps:
        print("Samplers (SDE and ODE, model and exact field): %s steps.\n" % ", ".join(str(k) for k in steps))
    # Results that also scored the memoryless SDE with the exact gDDIM step (tilt_ode_gap since issue 22's
    # sampler check): two more columns, the model's and the exact field's.
    exact_step = bool(rows) and all("model_exact_step_sde" in j for j in rows)
    if exact_step:
        print("SDE, exact step: the same memoryless SDE sampled with the exact gDDIM step (v frozen over each step) "
              "instead of Euler-Maruyama, on the same grid.\n")
    extra = ["SDE, exact step", "exact field SDE, exact step"] if exact_step else []
    print("| seed | d | reward | SDE / floor | ODE / floor | exact field SDE | exact field ODE | "
          + "".join(c + " | " for c in extra) + "train s | " + " | ".join("rel. err. t=%g" % t for t in times) + " |")
    print("|" + "---|" * (8 + len(extra) + len(times)))
    fmt = lambda r: "%.2f ± %.2f" % (r[0], r[1])
    for j in rows:
        p, m, e = j["problem"], j["model"], j["exact_field"]
        err = {round(v["t"], 2): v["relative"] for v in j["velocity_error"]}
        cells = [fmt(j["model_exact_step_sde"]), fmt(j["exact_field_exact_step_sde"])] if exact_step else []
        print("| %d | %d | %s | %s | %s | %s | %s | %s%.0f | %s |" % (
            p["random_seed"], p["dim"], p["reward"], fmt(m["sde"]), fmt(m["ode"]), fmt(e["sde"]), fmt(e["ode"]),
            "".join(c + " | " for c in cells), j["train_seconds"], " | ".join("%.3f" % err[t] for t in times)))
    if not rows:
        return
    print()
    goal = " (goal: median <= 1.5, worst <= 2)"
    columns = [("SDE", lambda j: j["model"]["sde"][0], goal), ("ODE", lambda j: j["model"]["ode"][0], goal)]
    if exact_step:
        columns += [("SDE, exact step", lambda j: j["model_exact_step_sde"][0], goal),
                    ("the exact field's SDE, exact step", lambda j: j["exact_field_exact_step_sde"][0],
                     " (the sampler's own error)")]
    for name, value, note in columns:
        v = sorted(value(j) for j in rows)
        print("- %s: median %.2f, worst %.2f, best %.2f over %d problems%s" % (
            name, statistics.median(v), v[-1], v[0], len(v), note))

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/random_family")
