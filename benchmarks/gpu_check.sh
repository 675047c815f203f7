#!/usr/bin/env bash
# The GPU check: one command on a cluster node, under 5 minutes on one GPU.
#   bash benchmarks/gpu_check.sh                      # -> benchmarks/out/gpu_check/gpu_check.{json,md}
#   bash benchmarks/gpu_check.sh --out /tmp/check     # any option of benchmarks/gpu_check.py
#   bash benchmarks/gpu_check.sh --device cpu --tiny  # the CPU smoke form (what the tests run)
# Uses $PYTHON, else the repository's .venv, else python3.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" "$here/gpu_check.py" "$@"
