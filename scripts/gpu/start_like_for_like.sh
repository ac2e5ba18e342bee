#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: bare vLLM on :8001 (start_bare.sh: the engine options of
# configs/gpu-bench-qwen3-0.6b.yaml, 0.4 of the GPU's memory), then the gateway on :8000 with the kit's start.sh
# (which finds bare vLLM up and leaves it). Compares the gateway with bare vLLM like for like.
# Usage: bash scripts/gpu/start_like_for_like.sh [CONFIG.yaml]
here=$(dirname "$0")
bash "$here/start_bare.sh" 8001 0.4 || exit 1
cp /tmp/bare_8001.pid /tmp/bare.pid && ln -sf /tmp/bare_8001.log /tmp/bare.log  # where the kit's scripts look
bash /tmp/extra/kit/start.sh "${1:-configs/gpu-bench-qwen3-0.6b.yaml}"
