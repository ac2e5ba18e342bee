#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: the gateway alone (`serve run CONFIG`) on :8000, no bare vLLM beside it,
# for runs that compare the gateway with itself (scripts/gpu/batch_fill.sh). Waits until it answers; fails fast.
# Usage: bash scripts/gpu/start_gateway.sh [CONFIG.yaml]    (log /tmp/gateway.log, pid /tmp/gateway.pid)
. /tmp/extra/kit/env.sh
config=$(realpath "${1:-configs/gpu-bench-qwen3-0.6b.yaml}")
setsid python3 -c "import sys; from ray.serve.scripts import cli; sys.argv=['serve','run','$config']; cli()" \
  > /tmp/gateway.log 2>&1 < /dev/null &
echo $! > /tmp/gateway.pid
for i in $(seq 1 100); do
  sleep 3
  curl -sf -m 2 127.0.0.1:8000/v1/models > /dev/null && { echo "gateway ready after $((i * 3))s"; exit 0; }
  kill -0 "$(cat /tmp/gateway.pid)" || { echo "gateway exited"; tail -30 /tmp/gateway.log; exit 1; }
  grep -qE "DEPLOY_FAILED|failed to deploy|No module named .serve_app" /tmp/gateway.log \
    && { echo "gateway failed"; grep -E -m 12 "Error|DEPLOY_FAILED" /tmp/gateway.log; exit 1; }
done
echo "gateway not ready"; tail -30 /tmp/gateway.log; exit 1
