#!/usr/bin/env bash
# On the GPU host, with the gateway on :8000 (any config with the Batch API on, the default): does a batch fill the
# capacity interactive traffic leaves, without slowing the interactive classes? Short unique prompts
# (PROMPT_TOKENS), OUT_TOKENS out, interactive mix high 20% / medium 30% / low 50% over PROCS client processes.
#   1. interactive capacity C: an open-loop run at PROBE_RATE req/s, meant to be above it (C = completed req/s);
#   2. the batch alone: ALONE_LINES lines; its output tokens/s is the capacity the batch can use (B);
#   3. interactive at LOAD x C for SECONDS s, no batch: TTFT p99 per class and its output tokens/s (I);
#   4. the same interactive run (its own seed) with a BATCH_LINES batch submitted a few seconds before it starts:
#      TTFT p99 per class, and the batch's output tokens/s over the interactive run's window (from /v1/stats);
#      then the batch is followed to its end and each custom_id checked once.
# Targets (issue 22): high and medium TTFT p99 in 4 <= 1.1x those of 3; batch tok/s in 4 >= 0.8 (B - I).
# summary.txt in $OUT, raw JSONs and logs in $OUT/batch_fill-raw-*.tgz.
# Usage: PROBE_RATE=150 bash scripts/gpu/batch_fill.sh
. /tmp/extra/kit/env.sh
set -u
OUT=${OUT:-/tmp/out}; raw=/tmp/batch_fill; rm -rf "$raw"; mkdir -p "$raw" "$OUT"
PROMPT_TOKENS=${PROMPT_TOKENS:-32}; OUT_TOKENS=${OUT_TOKENS:-128}; PROCS=${PROCS:-6}; LOAD=${LOAD:-0.7}
PROBE_RATE=${PROBE_RATE:-150}; PROBE_SECONDS=${PROBE_SECONDS:-15}; SECONDS_RUN=${SECONDS_RUN:-60}
ALONE_LINES=${ALONE_LINES:-4000}; BATCH_LINES=${BATCH_LINES:-10000}; MIX=high:0.2,medium:0.3,low:0.5
URL=http://127.0.0.1:8000
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
trap 'tar -czf "$OUT/batch_fill-raw-$(date +%H%M%S).tgz" -C "$raw" .' EXIT
curl -sf -m 10 "$URL/v1/models" > /dev/null || { say "$URL does not answer /v1/models: start the gateway first"; exit 1; }
curl -s -m 10 "$URL/v1/stats" | grep -q '"batch"' || { say "the gateway has no Batch API (batch.enabled false?)"; exit 1; }

count() { awk -v r="$1" -v s="$2" -v p="$PROCS" 'BEGIN { n = int(r * s / p + 0.999) * p; print (n < p ? p : n) }'; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null; }
interactive() {  # rate requests seed out.json
  timeout -k 10 $(( SECONDS_RUN + PROBE_SECONDS + 200 )) python3 -m serve_app.bench.split --url "$URL" --rate "$1" \
    --requests "$2" --processes "$PROCS" --max-tokens "$OUT_TOKENS" --prompt-tokens "$PROMPT_TOKENS" --seed "$3" \
    --priority-mix "$MIX" --timeout 120 --out "$4" >> "$raw/split.log" 2>&1 || say "  (split exited with $?: see split.log)"
}
batch() {  # lines seed out.json
  timeout -k 10 1500 python3 -m serve_app.bench.batch_fill --url "$URL" --lines "$1" --seed "$2" \
    --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$OUT_TOKENS" --out "$3" >> "$raw/batch.log" 2>&1
}
classes() {  # summary.json label
  python3 - "$1" "$2" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
s, label = json.load(open(sys.argv[1])), sys.argv[2]
print(f"{label}: ok {s['completed']}/{s['requests']}, {s['request_throughput']:.2f} req/s, "
      f"{s['output_token_throughput']:.0f} tok/s" + (" [client-bound]" if s.get("client_bound") else ""))
for name, p in s.get("per_priority", {}).items():
    late = p.get("ttft_from_intended_ms") or p["ttft_ms"]
    print(f"  {name:6s} TTFT p50 {late['p50'] or 0:.0f} p99 {late['p99'] or 0:.0f} ms (from schedule), "
          f"rejected {p['rejections']['count']}/{p['requests']}")
EOF
}

say "== $(date +%T) 1. interactive capacity: open loop at $PROBE_RATE req/s, $PROMPT_TOKENS tokens in, $OUT_TOKENS out"
interactive "$PROBE_RATE" "$(count "$PROBE_RATE" "$PROBE_SECONDS")" 1000 "$raw/probe.json"
C=$(field "$raw/probe.json" request_throughput)
[ -n "$C" ] && awk -v c="$C" 'BEGIN { exit !(c > 0) }' || { say "  no capacity measured"; exit 1; }
say "  C = $(printf '%.1f' "$C") req/s"
awk -v c="$C" -v r="$PROBE_RATE" 'BEGIN { exit !(c >= 0.9 * r) }' && say "  warning: C is near PROBE_RATE: raise it"

say "== $(date +%T) 2. the batch alone: $ALONE_LINES lines"
batch "$ALONE_LINES" 11 "$raw/alone.json" || say "  (the batch alone did not complete cleanly: see batch.log)"
B=$(field "$raw/alone.json" output_token_throughput); say "  B = $(printf '%.0f' "${B:-0}") output tok/s"

rate=$(awk -v c="$C" -v f="$LOAD" 'BEGIN { printf "%.2f", c * f }'); n=$(count "$rate" "$SECONDS_RUN")
say "== $(date +%T) 3. interactive at $LOAD C = $rate req/s for ${SECONDS_RUN} s, no batch"
interactive "$rate" "$n" 2000 "$raw/alone_interactive.json"
classes "$raw/alone_interactive.json" "  interactive alone"

say "== $(date +%T) 4. the same with a $BATCH_LINES-line batch"
batch "$BATCH_LINES" 13 "$raw/with.json" & bpid=$!
sleep 5  # the batch is validated and running when the interactive run starts
t0=$(date +%s.%N); interactive "$rate" "$n" 3000 "$raw/with_interactive.json"; t1=$(date +%s.%N)
classes "$raw/with_interactive.json" "  interactive with the batch"
say "  following the batch to its end"; wait $bpid || say "  (the batch did not complete cleanly: see batch.log)"
grep "^batch " "$raw/batch.log" | tail -1 | tee -a "$OUT/summary.txt"

python3 - "$raw" "$t0" "$t1" "$B" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
raw, t0, t1, B = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4] or 0)
alone, withb = (json.load(open(f"{raw}/{n}_interactive.json")) for n in ("alone", "with"))
batch = json.load(open(f"{raw}/with.json"))
# The batch's tokens over the interactive run, less its first and last 5 s (arrivals ramp and drain there).
series = [(t, tok) for t, tok, *_ in batch["timeline"]]
def at(x):  # tokens so far at time x, interpolated
    for (ta, a), (tb, b) in zip(series, series[1:]):
        if ta <= x <= tb:
            return a + (b - a) * (x - ta) / max(tb - ta, 1e-9)
    return series[-1][1] if x > series[-1][0] else 0
lo, hi = t0 + 5, t1 - 5
got = (at(hi) - at(lo)) / max(hi - lo, 1e-9)
used = alone["output_token_throughput"]
spare = B - used
print(f"== results: interactive alone {used:.0f} tok/s; the batch alone B = {B:.0f} tok/s; spare B - I = {spare:.0f}")
print(f"   batch tok/s during the interactive run: {got:.0f} = {got / spare:.2f}x of spare (target >= 0.8)"
      if spare > 0 else f"   batch tok/s during the interactive run: {got:.0f} (no spare measured)")
print(f"   interactive tok/s with the batch: {withb['output_token_throughput']:.0f} ({withb['output_token_throughput'] / max(used, 1e-9):.2f}x alone)")
for cls in ("high", "medium", "low"):
    a, w = alone["per_priority"].get(cls), withb["per_priority"].get(cls)
    if a and w:
        pa, pw = (p.get("ttft_from_intended_ms") or p["ttft_ms"] for p in (a, w))
        target = " (target <= 1.1)" if cls != "low" else ""
        print(f"   {cls:6s} TTFT p99 alone {pa['p99']:.0f} ms, with the batch {pw['p99']:.0f} ms: "
              f"{pw['p99'] / max(pa['p99'], 1e-9):.2f}x{target}")
print(f"   batch: {batch['status']}, {batch['answered']}/{batch['lines']} answered, {batch['answered_twice']} twice, "
      f"{batch['missing']} missing, {batch['non_200']} non-200")
EOF
curl -s -m 5 "$URL/v1/stats" > "$raw/stats_end.json"
