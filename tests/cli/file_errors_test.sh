#!/usr/bin/env bash
# Damaged and bad-valued files through the command line: truncated or corrupt gzip data, CSV values
# beyond float32, model files with NaN or overflowing weights, TorchScript modules that raise, whose
# reward has no gradient, or whose velocity is NaN part of the way. Each must stop tilt with exit 1
# and a message naming the file, and write nothing. The model and TorchScript cases need Debian's
# python3-torch (/usr/bin/python3) and are skipped without it.
# Usage: file_errors_test.sh path/to/tilt configs/
set -uo pipefail
source "$(dirname "$(realpath "$0")")/lib.sh"
tilt=$(realpath "$1")
configs=$(realpath "$2")
digits_data="$(dirname "$configs")/data/digits/digits.csv.gz"
py=${TILT_PYTHON:-/usr/bin/python3}  # Debian's python3-torch; the pyenv python3 on PATH does not see it
export OMP_NUM_THREADS=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

{ tiny_config 1 1; cat <<'TOML'
[pretrain]
hidden = [16, 16]
iterations = 5
batch_size = 32
[finetune]
hidden = [16, 16]
num_steps = 10
batch_size = 16
iterations = 2
loss_early_steps = 3
loss_late_steps = 3
TOML
} > tiny.toml

# 1. gzip data: the shipped digits cut in the middle, a stream of 1000 whole lines that never
#    ends (cut at a line boundary of the text), a flipped byte.
if python3 - "$digits_data" <<'PY'
import gzip, sys, zlib
raw = open(sys.argv[1], "rb").read()
open("cut.csv.gz", "wb").write(raw[: len(raw) // 2])
text = gzip.decompress(raw)
prefix = b"".join(text.splitlines(keepends=True)[:1000])
z = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
open("open.csv.gz", "wb").write(z.compress(prefix) + z.flush(zlib.Z_SYNC_FLUSH))
flipped = bytearray(raw)
flipped[len(raw) // 2] ^= 0x5A
open("flip.csv.gz", "wb").write(bytes(flipped))
PY
then
  cat > digits.toml <<'TOML'
seed = 0
threads = 1
[data]
type = "digits"
path = "cut.csv.gz"
[pretrain]
hidden = [16]
iterations = 2
batch_size = 16
TOML
  expect_error "digits cut in the middle" "data file 'cut.csv.gz' is truncated" \
    "$tilt" pretrain -q -c digits.toml -o e_cut
  expect_error "digits: 1000 whole lines of a stream that never ends" "data file 'open.csv.gz' is truncated" \
    "$tilt" pretrain -q -c digits.toml --set data.path=\"open.csv.gz\" -o e_open
  expect_error "digits with a flipped byte" "data file 'flip.csv.gz' is corrupt" \
    "$tilt" pretrain -q -c digits.toml --set data.path=\"flip.csv.gz\" -o e_flip
  expect_absent "damaged data files create no run directory" e_cut e_open e_flip
else
  fail "could not write the damaged gzip files with python3"
fi

# 2. CSV values beyond float32 (1e39 is a finite double, inf as float32).
printf 'x0,x1\n0.5,1\n3,1e39\n' > big.csv
expect_error "eval: 1e39 in a samples file" "samples file 'big.csv', line 3, column 2: '1e39' is outside the range of float32" \
  "$tilt" eval -c tiny.toml -s big.csv --replicates 1
cat > csv.toml <<'TOML'
seed = 0
threads = 1
[data]
type = "csv"
path = "big.csv"
[pretrain]
hidden = [16]
iterations = 2
batch_size = 2
TOML
expect_error "pretrain: 1e39 in the data" "samples file 'big.csv', line 3, column 2" "$tilt" pretrain -q -c csv.toml -o e_csv
expect_absent "pretrain on bad CSV data creates no run directory" e_csv

if ! "$py" -c "import torch" > /dev/null 2>&1; then
  skip "model files and TorchScript modules: Debian's python3-torch is not installed for $py"
  finish
  exit
fi

# 3. Model files with NaN or overflowing (finite, 1e38) weights, edited in Python.
if "$tilt" pretrain -q -c tiny.toml -o pre > log.txt 2>&1 && "$py" - > log.txt 2>&1 <<'PY'
import torch
d = torch.load("pre/model.pt")
d["0.weight"][0, 0] = float("nan")
del d["__tilt_checksum__"]  # an edited file drops its checksum (docs/config.md)
torch.save(d, "nan.pt")
d = torch.load("pre/model.pt")
for k, v in d.items():
    if v.is_floating_point():
        v.fill_(1e38)
del d["__tilt_checksum__"]
torch.save(d, "huge.pt")
d = torch.load("pre/model.pt")
d["0.weight"][0, 0] += 1
torch.save(d, "edited.pt")
PY
then
  expect_error "sample: a NaN weight" "model file 'nan.pt'" "$tilt" sample -m nan.pt -n 20 --steps 5 -o nan.csv
  expect_error "sample: the NaN weight's tensor is named" "'0.weight'" "$tilt" sample -m nan.pt -n 20 --steps 5 -o nan.csv
  expect_error "sample: weights of 1e38" "model file 'huge.pt'" "$tilt" sample -m huge.pt -n 20 --steps 5 -o huge.csv
  expect_error "sample: a model edited without dropping its checksum" "model file 'edited.pt' is damaged: its checksum does not match" \
    "$tilt" sample -m edited.pt -n 20 --steps 5 -o edited.csv
  expect_absent "no samples written from a bad model" nan.csv huge.csv edited.csv
else
  fail "pretrain / edit a model file in Python: $(cat log.txt)"
fi

# 4. TorchScript modules: a forward that raises, rewards without a gradient, a velocity that is
#    NaN for t in (0.6, 0.7) only (finite where tilt probes it on load).
cat > modules.py <<'PY'  # torch.jit.script reads the classes' source: a file, not stdin
import torch

class Raises(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dim = 2
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if bool((t > 0.1).any()):
            raise ValueError("this velocity model was exported without its weights")
        return -x

class NanOnThePath(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dim = 2
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bad = ((t > 0.6) & (t < 0.7)).unsqueeze(1)
        return torch.where(bad, x * float("nan"), -x)

class Good(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dim = 2
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x

class Detached(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x.detach() ** 2).sum(1)

class Constant(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.size(0))

for name, module in (("raises", Raises()), ("nanpath", NanOnThePath()), ("good", Good()),
                     ("detached", Detached()), ("constant", Constant())):
    torch.jit.script(module).save(name + ".ts")
PY
if "$py" modules.py > log.txt 2>&1; then
  cat > ts.toml <<'TOML'
seed = 2
threads = 1
[schedule]
type = "linear"
[base]
type = "torchscript"
path = "good.ts"
[reward]
type = "quadratic"
center = [2.0, 0.0]
precision = 0.5
[finetune]
hidden = [16, 16]
num_steps = 10
batch_size = 16
iterations = 2
loss_early_steps = 3
loss_late_steps = 3
TOML
  expect_error "TorchScript base whose forward raises: its message and the file" \
    "TorchScript model 'raises.ts': forward failed: ValueError: this velocity model was exported without its weights" \
    "$tilt" finetune -q -c ts.toml --set base.path=\"raises.ts\" -o e_raises
  for r in detached constant; do
    expect_error "TorchScript reward without a gradient ($r)" \
      "TorchScript reward '$r.ts': its output has no gradient with respect to x" \
      "$tilt" finetune -q -c ts.toml --set reward.type=\"torchscript\" --set reward.path=\"$r.ts\" -o e_$r
  done
  expect_absent "failed TorchScript runs create no run directory" e_raises e_detached e_constant
  # A model file whose velocity is NaN on part of the path: tilt sample fails, naming it.
  if "$tilt" finetune -q -c ts.toml --set base.path=\"nanpath.ts\" --set finetune.iterations=0 -o np > log.txt 2>&1; then
    expect_error "sample: NaN on the sampling path" "model file 'np/model.pt' gave 50 of 50 samples with NaN or Inf values" \
      "$tilt" sample -m np/model.pt -n 50 --steps 20 -o np.csv
    expect_absent "no NaN rows written" np.csv
  else
    fail "finetune with 0 iterations on nanpath.ts: $(cat log.txt)"
  fi
else
  fail "writing the TorchScript modules in Python: $(cat log.txt)"
fi

finish
