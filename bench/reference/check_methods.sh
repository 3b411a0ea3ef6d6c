#!/bin/sh
# ctest reference_methods: the PyTorch reference's iteration of every method (Adjoint Matching, RAM, EAM, the buffers)
# against tilt's Trainer, number by number (am_reference.py --check-methods). $1: the tilt_bench binary. Exits 77
# (skipped) where /usr/bin/python3 cannot import torch (Debian's python3-torch; scripts/setup.sh installs it).
if ! /usr/bin/python3 -c 'import torch' 2>/dev/null; then
  echo "skipped: /usr/bin/python3 cannot import torch (apt-get install python3-torch)"
  exit 77
fi
exec /usr/bin/python3 "$(dirname "$0")/am_reference.py" --check-methods --threads 2 --cpp-bench "$1"
