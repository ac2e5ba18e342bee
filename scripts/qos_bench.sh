#!/usr/bin/env bash
# The QoS experiment on CPU: bare vLLM with --scheduling-policy priority (class in its integer `priority`
# field) against the gateway (configs/bench.yaml, class in X-Priority), one after the other:
#   1. FCFS peak: bare vLLM, closed loop at 64 concurrent requests;
#   2. unloaded high TTFT: 30 high requests at 0.5 requests/s, on each server;
#   3. overload: Poisson arrivals at RATE_X (default 2) times the peak's request rate, mix high 20% /
#      medium 30% / low 50%, 400 requests, on each server. Latency is counted from the scheduled send time.
# Both servers must be up: `bash scripts/bare_vllm.sh --scheduling-policy priority` and
# `.venv/bin/serve run configs/bench.yaml`. Results land in $OUT (default docs/bench/qos-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench/qos-cpu}; RATE_X=${RATE_X:-2}; N=${N:-400}
BARE=http://127.0.0.1:8001; GATEWAY=http://127.0.0.1:8000
mkdir -p "$OUT"
bench() { .venv/bin/serve-app-bench --mode async --max-tokens 64 --ignore-eos --timeout 600 --no-plots "$@"; }
echo "== FCFS peak (bare vLLM, closed loop, 64 concurrent)"
bench --url $BARE --concurrency 64 --requests 192 --warmup 4 --out "$OUT/peak" > /dev/null
peak=$(.venv/bin/python -c "import json; s=json.load(open('$OUT/peak/results.json'))['steps'][0]['summary']; print(s['request_throughput'], s['output_token_throughput'])")
read -r peak_rps peak_tps <<< "$peak"
rate=$(.venv/bin/python -c "print(round($peak_rps * $RATE_X, 2))")
echo "peak $peak_rps req/s, $peak_tps tok/s; overload rate $rate req/s" | tee "$OUT/peak.txt"
for target in "bare $BARE vllm" "gateway $GATEWAY header"; do
  read -r name url as <<< "$target"
  echo "== $name: unloaded high, then $rate req/s mixed"
  bench --url "$url" --rate 0.5 --requests 30 --priority-mix high:1 --priority-as "$as" --warmup 2 \
    --out "$OUT/unloaded-$name" > /dev/null
  bench --url "$url" --rate "$rate" --requests "$N" --priority-mix high:0.2,medium:0.3,low:0.5 \
    --priority-as "$as" --warmup 0 --out "$OUT/overload-$name" > /dev/null
done
curl -s "$GATEWAY/v1/stats" > "$OUT/gateway-stats.json"
.venv/bin/python scripts/qos_table.py "$OUT" | tee "$OUT/summary.md"
