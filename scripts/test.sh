#!/usr/bin/env bash
# Installs everything, lints, and runs the whole test suite against the real vLLM engine on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
printf '\n==> ruff\n'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
printf '\n==> pytest\n'
exec .venv/bin/python -m pytest "$@"
