#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: bare vLLM (`vllm serve`) with the engine options of
# configs/gpu-bench-qwen3-0.6b.yaml (stream interval 4, API_SERVERS API server processes, 2 unless set; statistics on, for
# vLLM's prefix-cache and queue metrics) on PORT with
# MEM of the GPU's memory, and any NAME=VALUE given added to its environment. Waits until it answers; fails fast.
# Usage: bash scripts/gpu/start_bare.sh PORT MEM [NAME=VALUE...]    (log /tmp/bare_PORT.log, pid /tmp/bare_PORT.pid)
. /tmp/extra/kit/env.sh
port=${1:?port}; mem=${2:?share of GPU memory}; shift 2
setsid env "$@" python3 -m vllm.entrypoints.cli.main serve --model /tmp/extra/model --load-format dummy \
  --served-model-name qwen3-0.6b --max-model-len 8192 --max-num-seqs 256 --gpu-memory-utilization "$mem" \
  --scheduling-policy priority --host 127.0.0.1 --port "$port" --stream-interval 4 \
  --api-server-count "${API_SERVERS:-2}" > "/tmp/bare_$port.log" 2>&1 < /dev/null &
echo $! > "/tmp/bare_$port.pid"
for i in $(seq 1 80); do
  sleep 3
  curl -sf -m 2 "127.0.0.1:$port/v1/models" > /dev/null && { echo "bare vLLM :$port ($*) ready after $((i * 3))s"; exit 0; }
  kill -0 "$(cat "/tmp/bare_$port.pid")" || { echo "bare vLLM :$port exited"; tail -20 "/tmp/bare_$port.log"; exit 1; }
done
echo "bare vLLM :$port not ready"; tail -20 "/tmp/bare_$port.log"; exit 1
