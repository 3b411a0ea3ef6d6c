#!/usr/bin/env bash
# Issue 6 (part): Adjoint Sampling of unnormalised densities (docs/adjoint_sampling.md).
#
# 1. MCMC references (MALA + parallel tempering, `tilt mcmc`) for the double well and DW-4, cached under
#    build/adjoint_sampling/ (delete them to redraw).
# 2. `tilt adjoint-sampling` on configs/as_{gmm,double_well,dw4}.toml, each evaluated against exact
#    samples (GMM, double well: exact by construction / quadrature) and the MCMC reference.
# Writes $OUT/table.md and $OUT/adjoint_sampling.png; UPDATE_DOCS=1 copies them into docs/ (and the
# figure into docs/images/). Options (environment): OUT=runs/adjoint_sampling  THREADS=1
# About 5 min on one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh -DTILT_BUILD_APPS=ON >/dev/null

tilt=build/bin/tilt
out=${OUT:-runs/adjoint_sampling}
threads=${THREADS:-1}
cache=build/adjoint_sampling
mkdir -p "$out" "$cache"

for t in double_well dw4; do
  if [ ! -f "$cache/$t.csv" ]; then
    echo "adjoint_sampling: MCMC reference for $t" >&2
    "$tilt" mcmc -c configs/as_$t.toml --set threads="$threads" -o "$cache/$t.csv" -q >/dev/null
  fi
done

for t in gmm double_well dw4; do
  rm -rf "$out/$t"
  ref=()
  [ -f "$cache/$t.csv" ] && ref=(--reference "$cache/$t.csv")
  echo "adjoint_sampling: training $t" >&2
  "$tilt" adjoint-sampling -c configs/as_$t.toml --set threads="$threads" -o "$out/$t" "${ref[@]}" -q >/dev/null
done
python3 - "$out" "$cache" > "$out/table.md" <<'PY'
import json, sys
out, cache = sys.argv[1], sys.argv[2]
def f(x, s="%.3g"):
    return "-" if x is None else s % x
rows = []
print("| target | energy W2 (floor) | distance / x0 W2 (floor) | mode weights: samples | reweighted | exact or reference | log Z ± se (exact) | ESS/n | energy evals / gradient steps |")
print("|---|---|---|---|---|---|---|---|---|")
names = {"gmm": "GMM (2-D, 4 modes)", "double_well": "double well (2-D)", "dw4": "DW-4 (d = 8)"}
for t in ["gmm", "double_well", "dw4"]:
    e = json.load(open(f"{out}/{t}/eval.json"))
    for key, label in [("vs_exact", "exact"), ("vs_reference", "MCMC")]:
        if key not in e:
            continue
        c = e[key]
        ew = f"{f(c['energy_w2'])} ({f(c['energy_w2_floor'])})"
        if "distance_w2" in c:
            dw = f"d_ij: {f(c['distance_w2'])} ({f(c['distance_w2_floor'])})"
        else:
            dw = f"x0: {f(c['x0_w2'])} ({f(c['x0_w2_floor'])})"
        mw = lambda w: " / ".join("%.2f" % v for v in w) if w else "-"
        lz = e["log_z"]
        lzs = f"{lz['estimate']:.3f} ± {lz['standard_error']:.3f}" + (f" ({lz['exact']:.3f})" if "exact" in lz else "")
        ref_w = e.get("mode_weights_exact") if key == "vs_exact" else c.get("mode_weights")
        print(f"| {names[t]} vs {label} | {ew} | {dw} | {mw(e.get('mode_weights'))} | {mw(e.get('mode_weights_reweighted'))} | {mw(ref_w)} | {lzs} | {e['ess_fraction']:.3f} | {e['energy_evaluations']} / {e['gradient_steps']} |")
PY

"$tilt" plot -o "$out/adjoint_sampling.png" --columns 4 --size 260 \
  --title "Adjoint Sampling against exact samples (4000 each)" \
  "$out/gmm/samples.csv:GMM: Adjoint Sampling" "$out/gmm/exact.csv:GMM: exact" \
  "$out/double_well/samples.csv:double well: Adjoint Sampling" "$out/double_well/exact.csv:double well: exact" 2>/dev/null

cat "$out/table.md"
for t in gmm double_well dw4; do echo; cat "$out/$t/eval.txt"; done
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
  cp "$out/table.md" docs/adjoint_sampling_table.md
  { for t in gmm double_well dw4; do cat "$out/$t/eval.txt"; echo; done; } > docs/adjoint_sampling_eval.txt
  mkdir -p docs/images && cp "$out/adjoint_sampling.png" docs/images/adjoint_sampling.png
fi
