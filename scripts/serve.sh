#!/usr/bin/env bash
# Installs everything, then serves the default model on CPU at http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Ray Serve's throughput mode: the Router listens on :8000 itself (no proxy hop) and replicas keep one
# event loop. Measured in docs/benchmarks.md; set it to 0 to get Ray's default proxy.
export RAY_SERVE_THROUGHPUT_OPTIMIZED=${RAY_SERVE_THROUGHPUT_OPTIMIZED:-1}
exec .venv/bin/serve run "${1:-configs/local.yaml}"
