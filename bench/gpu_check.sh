#!/usr/bin/env bash
# Everything that needs a GPU in one call, ending with one table (bench/gpu_check.py says what it runs):
#   bash bench/gpu_check.sh        # about 5 minutes on one H100/H200; logs in $OUT or ./gpu-check
set -u
cd "$(dirname "$0")/.."
PATH="$PWD/.venv/bin:$PATH" python bench/gpu_check.py "$@"
