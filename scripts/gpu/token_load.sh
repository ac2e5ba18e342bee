#!/usr/bin/env bash
# On the GPU host, with bare vLLM on :8001 and the gateway on :8000 serving the same model: open-loop load by
# prompt length. For each length L in LENGTHS (unique synthetic prompts of about L tokens, OUT_TOKENS out):
#   1. bare vLLM's capacity C: an open-loop run at a rate meant to be above it (PROBE_RATES, L:req/s), about
#      PROBE_SECONDS of arrivals; C is the completed requests/s it measured (a backlog drains at capacity);
#   2. at 0.7 C and 1.5 C: bare (vLLM's own priority field) then the gateway (X-Priority header), each about
#      SECONDS_PER_RUN of arrivals, mix high 20% / medium 30% / low 50%, over PROCS client processes, with the
#      engines' prefix-cache counters read around each run; /v1/stats of the gateway after each of its runs.
# Every run has its own --seed, so none sends prompts an earlier run left in a prefix cache.
# summary.txt: per run and class TTFT p99, the gateway's queue wait p99, rejections, throughput gateway/bare, and
# a table at the end. raw JSONs, logs and stats in $OUT/token_load-raw-*.tgz. About 8 minutes with the defaults.
# Usage: LENGTHS="256 2048 6144" PROBE_RATES="256:120 2048:40 6144:14" bash scripts/gpu/token_load.sh
. /tmp/extra/kit/env.sh
set -u
OUT=${OUT:-/tmp/out}; raw=/tmp/token_load; rm -rf "$raw"; mkdir -p "$raw" "$OUT"
LENGTHS=${LENGTHS:-256 2048 6144}; OUT_TOKENS=${OUT_TOKENS:-128}; PROCS=${PROCS:-6}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}; PROBE_SECONDS=${PROBE_SECONDS:-15}
PROBE_RATES=${PROBE_RATES:-256:120 2048:40 6144:14}; MIX=high:0.2,medium:0.3,low:0.5
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
trap 'tar -czf "$OUT/token_load-raw-$(date +%H%M%S).tgz" -C "$raw" .' EXIT

for port in 8001 8000; do
  curl -sf -m 10 "127.0.0.1:$port/v1/models" > /dev/null \
    || { say "127.0.0.1:$port does not answer /v1/models: start bare vLLM (:8001) and the gateway (:8000) first"; exit 1; }
done

count() {  # rate seconds: requests for that many seconds of arrivals, a multiple of PROCS (split.py divides)
  awk -v r="$1" -v s="$2" -v p="$PROCS" 'BEGIN { n = int(r * s / p + 0.999) * p; print (n < p ? p : n) }'
}

seed=0
run() {  # port rate requests out.json [split.py options]: one bounded run
  local port=$1 rate=$2 n=$3 out=$4; shift 4
  seed=$(( seed + 1000 ))
  echo "== $(date +%T) port $port rate $rate n $n -> $out" >> "$raw/split.log"
  timeout -k 10 "$(( SECONDS_PER_RUN + PROBE_SECONDS + 150 ))" python3 -m serve_app.bench.split \
    --url "http://127.0.0.1:$port" --rate "$rate" --requests "$n" --processes "$PROCS" --max-tokens "$OUT_TOKENS" \
    --timeout 120 --seed "$seed" --out "$out" "$@" >> "$raw/split.log" 2>&1 \
    || say "  (run on :$port exited with $?: see split.log)"
}

classes() {  # summary.json label: one line for the run, one per class
  [ -s "$1" ] || { say "$2: no result"; return; }
  python3 - "$1" "$2" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
s, label = json.load(open(sys.argv[1])), sys.argv[2]
rate = (s.get("prefix_cache") or {}).get("hit_rate")
print(f"{label}: ok {s['completed']}/{s['requests']}, {s['request_throughput']:.2f} req/s, "
      f"{s['output_token_throughput']:.0f} tok/s" + (f", prefix cache hits {100 * rate:.1f}%" if rate is not None else "")
      + (" [client-bound]" if s.get("client_bound") else ""))
for name, p in s.get("per_priority", {}).items():
    wait = (p.get("queue_wait_ms") or {}).get("p99")
    late = p.get("ttft_from_intended_ms") or p["ttft_ms"]
    print(f"  {name:6s} TTFT p99 {late['p99'] or 0:.0f} ms (from schedule), queue wait p99 "
          + (f"{wait:.0f} ms" if wait is not None else "-") + f", rejected {p['rejections']['count']}/{p['requests']}")
EOF
}

field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null; }

for L in $LENGTHS; do
  probe=""
  for pair in $PROBE_RATES; do [ "${pair%%:*}" = "$L" ] && probe=${pair#*:}; done
  [ -n "$probe" ] || { say "== $L tokens: no probe rate in PROBE_RATES, skipped"; continue; }
  say "== $L tokens in, $OUT_TOKENS out: capacity probe on bare at $probe req/s"
  run 8001 "$probe" "$(count "$probe" "$PROBE_SECONDS")" "$raw/len${L}_probe.json" --priority-as vllm \
    --prompt-tokens "$L" --engine-metrics auto
  C=$(field "$raw/len${L}_probe.json" request_throughput)
  [ -n "$C" ] && awk -v c="$C" 'BEGIN { exit !(c > 0) }' || { say "  no capacity measured: $L skipped"; continue; }
  say "  capacity C = $(printf '%.2f' "$C") req/s"
  awk -v c="$C" -v r="$probe" 'BEGIN { exit !(c >= 0.9 * r) }' \
    && say "  warning: C is near the probe rate, so the probe may not have saturated bare: raise PROBE_RATES for $L"
  for f in 0.7 1.5; do
    rate=$(awk -v c="$C" -v f="$f" 'BEGIN { printf "%.2f", c * f }'); n=$(count "$rate" "$SECONDS_PER_RUN")
    for side in bare gw; do
      if [ $side = bare ]; then port=8001; as=vllm; else port=8000; as=header; fi
      out="$raw/len${L}_x${f}_$side.json"
      run $port "$rate" "$n" "$out" --priority-as $as --priority-mix "$MIX" --prompt-tokens "$L" --engine-metrics auto
      [ $side = gw ] && curl -s -m 5 127.0.0.1:8000/v1/stats > "$raw/len${L}_x${f}_gw_stats.json"
      classes "$out" "$L tok, ${f} C = $rate req/s, $side"
    done
    bare_t=$(field "$raw/len${L}_x${f}_bare.json" request_throughput); gw_t=$(field "$raw/len${L}_x${f}_gw.json" request_throughput)
    [ -n "$bare_t" ] && [ -n "$gw_t" ] && say "  throughput gateway/bare: $(awk -v g="$gw_t" -v b="$bare_t" 'BEGIN { printf (b > 0 ? "%.3f" : "-"), g / (b > 0 ? b : 1) }')"
  done
done

say "== gateway vs bare (TTFT p99 in ms; ratio = gateway/bare; queue wait = the gateway's, p99 ms)"
python3 - "$raw" "$LENGTHS" <<'EOF' | tee -a "$OUT/summary.txt"
import json, os, sys
raw, lengths = sys.argv[1], sys.argv[2].split()
def load(name):
    path = os.path.join(raw, name)
    return json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else None
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"
def ms(v):
    return f"{v:.0f}" if v is not None else "-"
print(f"{'len':>5} {'load':>5} {'C':>7} {'thr g/b':>7} {'class':>6} {'bare':>7} {'gw':>7} {'ratio':>6} {'qwait':>6} {'rej b/g':>9}")
for length in lengths:
    probe = load(f"len{length}_probe.json")
    cap = f"{probe['request_throughput']:.1f}" if probe else "-"
    for f in ("0.7", "1.5"):
        bare, gw = load(f"len{length}_x{f}_bare.json"), load(f"len{length}_x{f}_gw.json")
        if not bare or not gw:
            print(f"{length:>5} {f + 'C':>5} {cap:>7}  (missing run)")
            continue
        thr = ratio(gw["request_throughput"], bare["request_throughput"])
        for cls in ("high", "medium", "low"):
            b, g = bare.get("per_priority", {}).get(cls), gw.get("per_priority", {}).get(cls)
            if not b or not g:
                continue
            late_b, late_g = b.get("ttft_from_intended_ms") or b["ttft_ms"], g.get("ttft_from_intended_ms") or g["ttft_ms"]
            tb, tg = late_b["p99"], late_g["p99"]  # from the scheduled send time: a late client counts
            wait = (g.get("queue_wait_ms") or {}).get("p99")
            rej = f"{b['rejections']['count']}/{g['rejections']['count']}"
            print(f"{length:>5} {f + 'C':>5} {cap:>7} {thr:>7} {cls:>6} {ms(tb):>7} {ms(tg):>7} {ratio(tg, tb):>6} {ms(wait):>6} {rej:>9}")
EOF
