#!/usr/bin/env bash
# Installs everything, then serves the default model on CPU at http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The Router listens on :8000 itself (the config turns Ray's proxy off), so there is no proxy hop.
export RAY_worker_niceness=${RAY_worker_niceness:-0}  # Ray runs its workers at nice 15 otherwise (serve_app/deployments/process_priority.py)
exec .venv/bin/serve run "${1:-configs/local.yaml}"
