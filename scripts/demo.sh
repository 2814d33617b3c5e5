#!/usr/bin/env bash
# The README's main job: set up .venv, then quantize SmolLM2-135M, evaluate, generate and time it.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo runs on the CPU: without a working GPU, skip the CUDA module's build (minutes of nvcc).
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }; then
  export FXK_BUILD_CUDA="${FXK_BUILD_CUDA:-0}"
fi
bash scripts/setup_env.sh test,hf,bench
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/flexround demo "$@"
