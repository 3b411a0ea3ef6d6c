#!/usr/bin/env bash
# Times `tilt eval` on the issue-22 case (docs/performance.md, "tilt eval: the pair sums"): three files of
# 10,000 samples of a 3-D anisotropic three-component mixture (exact target samples of two seeds, and the
# base), 2 threads. Usage: scripts/eval_timing.sh [build/bin/tilt] [n]
set -euo pipefail
tilt=$(realpath "${1:-build/bin/tilt}")
n=${2:-10000}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cd "$dir"
cat > mix3d.toml <<'TOML'
seed = 0
threads = 2
[schedule]
type = "linear"
[data]
type = "gmm"
means = [[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0], [0.0, -2.5, 0.5]]
weights = [0.5, 0.3, 0.2]
covariances = [[[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 0.3]],
               [[0.4, 0.0, 0.1], [0.0, 1.2, -0.2], [0.1, -0.2, 0.6]],
               [[0.8, -0.2, 0.0], [-0.2, 0.3, 0.0], [0.0, 0.0, 1.0]]]
[base]
type = "exact"
[reward]
type = "quadratic"
center = [1.0, 0.5, 0.0]
precision = 0.3
lambda = 1.0
TOML
"$tilt" sample -c mix3d.toml --exact target -n "$n" --set seed=1 -o a.csv 2> /dev/null
"$tilt" sample -c mix3d.toml --exact target -n "$n" --set seed=2 -o b.csv 2> /dev/null
"$tilt" sample -c mix3d.toml --exact base -n "$n" --set seed=3 -o c.csv 2> /dev/null
start=$(date +%s.%N)
"$tilt" eval -c mix3d.toml -s a.csv -s b.csv -s c.csv --threads 2 2> /dev/null
echo "tilt eval: $(echo "$(date +%s.%N) - $start" | bc) s wall"
