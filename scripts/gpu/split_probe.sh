#!/usr/bin/env bash
# On the GPU host, with bare vLLM on :8001 and the gateway on :8000 (start_like_for_like.sh): `vllm bench serve`
# (random 256 in / 128 out) at concurrency CONC, split in parts. Each round runs bare vLLM, the gateway's own vLLM
# server called directly (no Router, no Admission; DIRECT=0 leaves it out), the gateway, and every port in EXTRA
# (say a second bare vLLM from start_bare.sh with other settings); ROUNDS rounds, interleaved. With PYSPY set, one
# more round samples each target's engine core and API servers under load (py-spy raw stacks). Last, what differs
# between the vLLM servers' processes (niceness, CPUs, environment) and the engine options each one logged.
# Each `vllm bench serve` spends ~30 s starting (tokenizer, prompts) before its load.
# Usage: CONC=256 ROUNDS=2 EXTRA="8002" PYSPY=/tmp/py-spy bash scripts/gpu/split_probe.sh  (results: $OUT/split_c$CONC.txt)
. /tmp/extra/kit/env.sh
. "$(dirname "$0")/bench_serve.sh"
OUT=${OUT:-/tmp/out}; CONC=${CONC:-1}; raw=/tmp/measure/split_c$CONC; mkdir -p "$raw/prof" "$OUT"
N=${N:-$(( CONC < 16 ? 32 : CONC * 16 ))}  # at 256: 4096 requests, ~20 s of load on an H200
say() { echo "$*" | tee -a "$OUT/split_c$CONC.txt"; }
args=$(ps -eo args | grep "[s]erve_app.engine_process" | head -1)
[ -n "$args" ] || { say "no engine_process found"; exit 1; }
child="$(echo "$args" | sed -E 's/.*--host ([^ ]+).*/\1/'):$(echo "$args" | sed -E 's/.*--port ([0-9]+).*/\1/')"
procs() { echo "$1"; pgrep -P "$1" | while read -r c; do procs "$c"; done; }
server_pid() {  # the vLLM server behind a target
  case $1 in
    127.0.0.1:8001) cat /tmp/bare.pid ;;
    127.0.0.1:8000|"$child") pgrep -f "[s]erve_app.engine_process" | head -1 ;;
    *) cat "/tmp/bare_${1##*:}.pid" ;;
  esac
}
targets="127.0.0.1:8001 $([ "${DIRECT:-1}" = 1 ] && echo "$child") 127.0.0.1:8000"
for port in ${EXTRA:-}; do targets="$targets 127.0.0.1:$port"; done
say "== c=$CONC, $N requests: $targets"
for r in $(seq 1 "${ROUNDS:-2}"); do
  for target in $targets; do
    log="$raw/r${r}_$(echo "$target" | tr ':.' '__').log"
    bench_serve "$target" "$CONC" "$N" "$log"
    say "round $r $target $(bench_summary "$log")"
  done
done
if [ -x "${PYSPY:-}" ]; then
  say "== profiling round: py-spy of each target's engine core and API servers, 8 s under load"
  for target in $targets; do
    name=$(echo "$target" | tr ':.' '__'); log="$raw/prof_$name.log"
    bench_serve "$target" "$CONC" "$N" "$log" &
    for _ in $(seq 1 240); do grep -q "Starting main benchmark" "$log" 2>/dev/null && break; sleep 0.5; done
    sleep 2  # past the client's start (tokenizer, prompts: ~30 s), into the load
    for pid in $(procs "$(server_pid "$target")"); do
      comm=$(ps -o comm= -p "$pid" | tr -c 'A-Za-z0-9\n' '_')
      "$PYSPY" record -d 8 -r 100 -f raw --nonblocking --threads -o "$raw/prof/${name}_${comm}_$pid.txt" --pid "$pid" \
        > "$raw/prof/${name}_${comm}_$pid.log" 2>&1 &
    done
    top -b -n 2 -d 4 -w 200 | awk '/^top -/{n++} n==2' | head -n 40 > "$raw/prof/top_$name.txt"
    wait
    say "profiled $target $(bench_summary "$log")"
  done
fi
say "== the vLLM servers and their children (engine core, API servers)"
for target in 127.0.0.1:8001 127.0.0.1:8000 ${EXTRA:+$(for p in $EXTRA; do echo 127.0.0.1:$p; done)}; do
  for pid in $(procs "$(server_pid "$target")"); do
    say "$target pid $pid $(ps -o ni=,comm= -p "$pid") cpus=$(python3 -c "import os,sys; print(len(os.sched_getaffinity(int(sys.argv[1]))))" "$pid")" \
      "env: $(tr '\0' '\n' < /proc/"$pid"/environ | grep -E '^(OMP|KMP|GOMP|MKL|CUDA|VLLM_|TORCH|PYTORCH|LD_|MALLOC|NCCL)' | sort | tr '\n' ' ')"
  done
done
say "== engine options each server logged"
grep -h "non-default args" /tmp/bare_*.log /tmp/gateway.log /tmp/ray/session_latest/logs/worker-*.out 2>/dev/null | cut -c1-1500 | tee -a "$OUT/split_c$CONC.txt"
tar -czf "$OUT/split_c$CONC-$(date +%H%M%S).tgz" -C "$raw" .
