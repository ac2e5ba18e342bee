#!/usr/bin/env bash
# Bare vLLM on the default model, with the engine options of configs/bench.yaml: the baseline the
# benchmark compares the gateway against. Port 8001 unless PORT is set; extra arguments go to vLLM, e.g.
# `--scheduling-policy priority`. Run scripts/install.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=$(.venv/bin/python -m serve_app.engine.model_files)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
  --served-model-name smollm2-135m-instruct --dtype float32 --max-model-len 2048 --max-num-seqs 64 \
  --disable-log-stats --host 127.0.0.1 --port "${PORT:-8001}" "$@"
