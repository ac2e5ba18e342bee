#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: the routing policies compared on one set of warm engines.
#   1. stops whatever holds the GPU (bare vLLM, an earlier gateway, orphaned engines) and waits for its memory;
#   2. starts the gateway with configs/gpu-bench-4-replicas.yaml (four replicas sharing the GPU, small KV caches);
#   3. for each workload and policy (switched live with PUT /v1/admin/routing), one open-loop run over PROCS client
#      processes, mix high 20% / medium 30% / low 50%, each run with its own seed (so its own prefixes: no run
#      finds another's in the caches), vLLM's prefix-cache counters read around it:
#      - shared prefixes (PREFIXES x PREFIX_TOKENS, SUFFIX_TOKENS unique, OUT_TOKENS out; together more than one
#        replica's KV cache) at RATE: least_loaded, cache_aware, cache_aware_class_blind;
#      - unique prompts of PREFIX_TOKENS + SUFFIX_TOKENS at NOPREFIX_RATE: least_loaded, cache_aware.
# summary.txt: per run and class TTFT p50/p99 (from the scheduled send), throughput, hit rate; raw in $OUT/*.tgz.
# OVER_RATE (unset: skipped): class-aware against class-blind again at a rate that overloads even the warm replicas.
# Usage: RATE=120 NOPREFIX_RATE=30 OVER_RATE=300 bash scripts/gpu/prefix_routing.sh
. /tmp/extra/kit/env.sh
set -u
OUT=${OUT:-/tmp/out}; raw=/tmp/prefix_routing; rm -rf "$raw"; mkdir -p "$raw" "$OUT"
RATE=${RATE:-120}; NOPREFIX_RATE=${NOPREFIX_RATE:-30}; SECONDS_PER_RUN=${SECONDS_PER_RUN:-12}; PROCS=${PROCS:-6}
PREFIXES=${PREFIXES:-32}; PREFIX_TOKENS=${PREFIX_TOKENS:-4096}; SUFFIX_TOKENS=${SUFFIX_TOKENS:-64}
OUT_TOKENS=${OUT_TOKENS:-64}; MIX=high:0.2,medium:0.3,low:0.5; CONFIG=${CONFIG:-configs/gpu-bench-4-replicas.yaml}
POLICIES=${POLICIES:-least_loaded cache_aware cache_aware_class_blind}
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
trap 'cp /tmp/gateway.log "$raw/" 2>/dev/null; tar -czf "$OUT/prefix_routing-raw-$(date +%H%M%S).tgz" -C "$raw" .' EXIT

gpu_free() {  # kills what holds the GPU, then waits until no compute process is left
  for f in /tmp/bare*.pid /tmp/gateway.pid; do [ -f "$f" ] && kill -TERM -- "-$(cat "$f")" 2>/dev/null; done
  sleep 5
  ray stop --force > /dev/null 2>&1
  for _ in $(seq 1 30); do
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' ')
    [ -z "$pids" ] && { say "GPU free"; return 0; }
    echo "$pids" | xargs -r kill -9 2>/dev/null; sleep 2
  done
  say "GPU still held: $(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader)"; return 1
}

if [ "${RESTART:-1}" = 1 ]; then
  gpu_free || exit 1
  setsid python3 -c "import sys; from ray.serve.scripts import cli; sys.argv=['serve','run','$CONFIG']; cli()" \
    > /tmp/gateway.log 2>&1 < /dev/null &
  echo $! > /tmp/gateway.pid
  for i in $(seq 1 100); do
    sleep 3
    n=$(curl -s -m 2 127.0.0.1:8000/health | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicas"])' 2>/dev/null)
    [ "${n:-0}" -ge 4 ] && { say "gateway with $n replicas after $((i * 3)) s"; break; }
    kill -0 "$(cat /tmp/gateway.pid)" 2>/dev/null || { say "gateway exited"; tail -30 /tmp/gateway.log; exit 1; }
    grep -qE "DEPLOY_FAILED|failed to deploy" /tmp/gateway.log && { say "gateway failed"; grep -E -m 12 "Error" /tmp/gateway.log; exit 1; }
  done
  [ "${n:-0}" -ge 4 ] || { say "gateway not ready: ${n:-0} replicas"; tail -30 /tmp/gateway.log; exit 1; }
fi

seed=500
run() {  # policy rate label [workload options]
  local policy=$1 rate=$2 label=$3; shift 3
  seed=$(( seed + 1000 ))
  curl -s -m 10 -X PUT 127.0.0.1:8000/v1/admin/routing -d "{\"routing\": \"$policy\"}" > /dev/null
  local n; n=$(awk -v r="$rate" -v s="$SECONDS_PER_RUN" -v p="$PROCS" 'BEGIN { print int(r * s / p + 0.999) * p }')
  local out="$raw/${label}_${policy}.json"
  timeout -k 10 300 python3 -m serve_app.bench.split --url http://127.0.0.1:8000 --rate "$rate" --requests "$n" \
    --processes "$PROCS" --max-tokens "$OUT_TOKENS" --priority-mix "$MIX" --seed "$seed" --timeout 240 \
    --engine-metrics auto --out "$out" "$@" >> "$raw/split.log" 2>&1 || say "  (run exited with $?: see split.log)"
  curl -s -m 5 127.0.0.1:8000/v1/stats > "$raw/${label}_${policy}_stats.json"
  python3 - "$out" "$label $policy at $rate req/s" <<'EOF' | tee -a "$OUT/summary.txt"
import json, os, sys
path, label = sys.argv[1], sys.argv[2]
if not os.path.exists(path) or not os.path.getsize(path):
    sys.exit(print(f"{label}: no result"))
s = json.load(open(path))
hit = (s.get("prefix_cache") or {}).get("hit_rate")
late = s.get("ttft_from_intended_ms") or s["ttft_ms"]
hits = f"{100 * hit:.1f}%" if hit is not None else "-"
print(f"{label}: ok {s['completed']}/{s['requests']}, {s['request_throughput']:.1f} req/s, "
      f"{s['output_token_throughput']:.0f} tok/s, TTFT p50 {late['p50'] or 0:.0f} p99 {late['p99'] or 0:.0f} ms, "
      f"prefix hits {hits}")
for name, p in s.get("per_priority", {}).items():
    t = p.get("ttft_from_intended_ms") or p["ttft_ms"]
    print(f"  {name:6s} TTFT p50 {t['p50'] or 0:.0f} p99 {t['p99'] or 0:.0f} ms, rejected {p['rejections']['count']}/{p['requests']}")
EOF
}

say "== shared prefixes: $PREFIXES x $PREFIX_TOKENS tokens, $SUFFIX_TOKENS-token suffixes, $OUT_TOKENS out, $RATE req/s"
for policy in $POLICIES; do
  run "$policy" "$RATE" shared --prefixes "$PREFIXES" --prefix-tokens "$PREFIX_TOKENS" --suffix-tokens "$SUFFIX_TOKENS"
done
if [ -n "${OVER_RATE:-}" ]; then  # class awareness where the warm replicas are overloaded even with their caches
  say "== shared prefixes at $OVER_RATE req/s (overload): class-aware against class-blind"
  for policy in cache_aware cache_aware_class_blind; do
    run "$policy" "$OVER_RATE" over --prefixes "$PREFIXES" --prefix-tokens "$PREFIX_TOKENS" --suffix-tokens "$SUFFIX_TOKENS"
  done
fi
say "== no shared prefix: unique prompts of $((PREFIX_TOKENS + SUFFIX_TOKENS)) tokens, $NOPREFIX_RATE req/s"
for policy in least_loaded cache_aware; do
  run "$policy" "$NOPREFIX_RATE" unique --prompt-tokens "$((PREFIX_TOKENS + SUFFIX_TOKENS))"
done
curl -s -m 10 -X PUT 127.0.0.1:8000/v1/admin/routing -d '{"routing": "cache_aware"}' > /dev/null

say "== ratios against least_loaded (throughput, TTFT p50 from the schedule; high's TTFT p99 class-aware / class-blind)"
python3 - "$raw" <<'EOF' | tee -a "$OUT/summary.txt"
import json, os, sys
raw = sys.argv[1]
def load(name):
    path = os.path.join(raw, name + ".json")
    return json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else None
def ttft(s, cls=None, q="p50"):
    part = s if cls is None else s.get("per_priority", {}).get(cls, {})
    late = part.get("ttft_from_intended_ms") or part.get("ttft_ms") or {}
    return late.get(q)
for label in ("shared", "unique"):
    base = load(f"{label}_least_loaded")
    for policy in ("cache_aware", "cache_aware_class_blind"):
        s = load(f"{label}_{policy}")
        if not base or not s:
            continue
        thr = s["request_throughput"] / base["request_throughput"] if base["request_throughput"] else float("nan")
        a, b = ttft(s), ttft(base)
        print(f"{label:6s} {policy:24s} throughput {thr:.2f}x, TTFT p50 {a / b if a and b else float('nan'):.2f}x")
for label in ("shared", "over"):
    aware, blind = load(f"{label}_cache_aware"), load(f"{label}_cache_aware_class_blind")
    if aware and blind:
        a, b = ttft(aware, "high", "p99"), ttft(blind, "high", "p99")
        print(f"{label}: high TTFT p99 class-aware {a:.0f} ms, class-blind {b:.0f} ms: {a / b:.2f}x")
EOF
