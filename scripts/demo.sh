#!/usr/bin/env bash
# The README's main job: set up .venv, then quantize SmolLM2-135M, evaluate, generate and time it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,hf,bench
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/flexround demo "$@"
