#!/usr/bin/env bash
# The GPU day: train step (eager vs compiled, MFU), SiT-XL/2 SDE-250 sampling vs REPA's generate.py loop,
# projected FID-50K wall time, and the SiT-XL/2 alignment pass (10 000 images x 28 blocks x 11 timesteps),
# appended as a dated section to docs/benchmarks.md. One H100 / H200, at most 8 minutes (hard limit below).
# See benchmarks/gpu.py for what each number is.
#
#   bash benchmarks/gpu.sh               # on a GPU machine, from the repository root
#   bash benchmarks/gpu.sh --dry-run     # tiny sizes on the CPU, prints only (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
if [[ " $* " == *" --dry-run "* ]]; then
  exec "$PY" benchmarks/gpu.py "$@"
fi
exec timeout --signal=INT 480 "$PY" benchmarks/gpu.py --out docs/benchmarks.md "$@"
