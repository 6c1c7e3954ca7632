#!/usr/bin/env bash
# GPU figures for docs/PERFORMANCE.md: python bench/gpu_check.py [--quick]. Needs torch and
# torchvision only; skips with a message where there is no CUDA GPU (or DALI, for its part).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" bench/gpu_check.py "$@"
