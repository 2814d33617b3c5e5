#!/usr/bin/env bash
# The README's test command: set up .venv, lint, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,hf
# Lint first (ruff: configuration in pyproject.toml; installed by the test extra): seconds, and a
# finding fails the run before the suite's minutes are spent.
.venv/bin/ruff check .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec .venv/bin/python -m pytest -q tests "$@"
