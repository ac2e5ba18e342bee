#!/usr/bin/env bash
# On the GPU host, once ../shared/gpu/device/start.sh has bare vLLM on :8001 and the gateway on :8000:
#   closed loop: `vllm bench serve` (random 256 in / 128 out) at CONCS, bare then gateway at each concurrency;
#   during the gateway's largest run: CPU of every process (top) and py-spy of each Router and LLMServer replica;
#   open loop: OPEN_RATE req/s, 256 out, mix high 20% / medium 30% / low 50%, over 4 client processes, bare then
#   gateway, after an unloaded high-only run on each.
# Everything lands in $OUT (summary.txt, and raw.tgz with the JSONs, logs and profiles).
# Usage: PYSPY=path/to/py-spy PARTS="closed open" bash scripts/gpu/measure.sh
. /tmp/extra/kit/env.sh
. "$(dirname "$0")/bench_serve.sh"
OUT=${OUT:-/tmp/out}; raw=/tmp/measure; mkdir -p "$raw/prof" "$OUT"
CONCS=${CONCS:-1 64 256}; PARTS=${PARTS:-closed open}; OPEN_RATE=${OPEN_RATE:-80}; OPEN_N=${OPEN_N:-1600}
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
state() {  # the gateway's live admission state: adaptive limit, queues, preemptions, sheds
  say "gateway state: $(curl -s -m 5 127.0.0.1:8000/v1/stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["router"])')"
}

profile() {  # waits for the gateway's load, then samples it
  for _ in $(seq 1 120); do
    n=$(curl -s -m 2 127.0.0.1:8000/health | python3 -c "import json,sys; print(json.load(sys.stdin).get('in_flight',0))" 2>/dev/null)
    [ "${n:-0}" -gt 100 ] && break; sleep 0.5
  done
  top -b -n 2 -d 5 -w 200 > "$raw/prof/top.txt" &
  if [ -x "${PYSPY:-}" ]; then
    ps -eo pid,args | grep -E "ServeReplica:gateway:(Router|LLMServer|Admission)" | grep -v grep | while read -r pid args; do
      name=$(echo "$args" | grep -oE "(Router|LLMServer|Admission)")_$pid
      "$PYSPY" record -d 8 -r 100 -f raw --nonblocking -o "$raw/prof/$name.txt" --pid "$pid" > "$raw/prof/$name.log" 2>&1 &
    done
  fi
  wait
}

if [[ " $PARTS " == *" closed "* ]]; then
  say "== closed loop: vllm bench serve, random 256 in / 128 out"
  for c in $CONCS; do
    n=$(( c < 16 ? 24 : c * 4 ))
    for port in 8001 8000; do
      [ "$c" = "${CONCS##* }" ] && [ "$port" = 8000 ] && { profile & }
      bench_serve "127.0.0.1:$port" "$c" "$n" "$raw/bench_c${c}_p${port}.log" --save-result --result-dir "$raw" \
        --result-filename "c${c}_p${port}.json"
      say "c=$c port=$port $(bench_summary "$raw/bench_c${c}_p${port}.log")"
    done
    wait
  done
  curl -s -m 5 127.0.0.1:8000/v1/stats > "$raw/gateway_stats_after_closed.json"
  state
fi

if [[ " $PARTS " == *" open "* ]]; then
  for port in 8001 8000; do
    as=$([ $port = 8001 ] && echo vllm || echo header)
    say "== open loop, port $port: unloaded high (2 req/s), then $OPEN_RATE req/s mixed"
    python3 -m serve_app.bench.split --url http://127.0.0.1:$port --rate 2 --processes 1 --requests 40 \
      --max-tokens 256 --priority-mix high:1 --priority-as $as --out "$raw/open_unloaded_p$port.json" | tee -a "$OUT/summary.txt"
    python3 -m serve_app.bench.split --url http://127.0.0.1:$port --rate "$OPEN_RATE" --processes 4 \
      --requests "$OPEN_N" --max-tokens 256 --priority-mix high:0.2,medium:0.3,low:0.5 --priority-as $as \
      --out "$raw/open_r${OPEN_RATE}_p$port.json" | tee -a "$OUT/summary.txt"
  done
  state
fi
curl -s -m 5 127.0.0.1:8000/v1/stats > "$raw/gateway_stats.json"
cp /tmp/gateway.log "$raw/" 2>/dev/null
tar -czf "$OUT/raw-$(date +%H%M%S).tgz" -C "$raw" .
