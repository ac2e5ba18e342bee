#!/usr/bin/env bash
# Installs everything, then serves the default model on CPU at http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/serve run "${1:-configs/local.yaml}"
