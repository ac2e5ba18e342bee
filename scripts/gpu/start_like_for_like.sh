#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: bare vLLM (`vllm serve`) on :8001 with the engine options of
# configs/gpu-bench-qwen3-0.6b.yaml (stream interval 4 and API_SERVERS API server processes, 2 unless set), then the
# gateway on :8000 with the kit's start.sh (which finds bare vLLM up and leaves it). Compares the gateway with bare
# vLLM like for like.
. /tmp/extra/kit/env.sh
setsid python3 -m vllm.entrypoints.cli.main serve --model /tmp/extra/model --load-format dummy \
  --served-model-name qwen3-0.6b --max-model-len 4096 --max-num-seqs 256 --gpu-memory-utilization 0.4 \
  --scheduling-policy priority --host 127.0.0.1 --port 8001 --disable-log-stats --stream-interval 4 --api-server-count "${API_SERVERS:-2}" \
  > /tmp/bare.log 2>&1 < /dev/null &
echo $! > /tmp/bare.pid
for i in $(seq 1 80); do
  sleep 3
  curl -sf -m 2 127.0.0.1:8001/v1/models > /dev/null && break
  kill -0 "$(cat /tmp/bare.pid)" || { echo "bare vLLM exited"; tail -20 /tmp/bare.log; exit 1; }
done
echo "bare vLLM (stream interval 4, ${API_SERVERS:-2} API servers) ready after $((i * 3))s"
bash /tmp/extra/kit/start.sh "${1:-configs/gpu-bench-qwen3-0.6b.yaml}"
