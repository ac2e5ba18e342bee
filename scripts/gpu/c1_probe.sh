#!/usr/bin/env bash
# On the GPU host, with bare vLLM on :8001 and the gateway on :8000 (start_like_for_like.sh): TTFT at concurrency 1,
# split in two. Each round runs `vllm bench serve` (random 256 in / 128 out, 32 requests) against bare vLLM, against
# the gateway's own vLLM server called directly (no Router, no Admission) and against the gateway; ROUNDS rounds,
# interleaved. Then what differs between the two vLLM servers' processes: niceness, CPUs, environment.
# Usage: ROUNDS=3 bash scripts/gpu/c1_probe.sh        (results in $OUT/c1_probe.txt)
. /tmp/extra/kit/env.sh
OUT=${OUT:-/tmp/out}; raw=/tmp/measure/c1; mkdir -p "$raw" "$OUT"
say() { echo "$*" | tee -a "$OUT/c1_probe.txt"; }
args=$(ps -eo args | grep "[s]erve_app.engine_process" | head -1)
[ -n "$args" ] || { say "no engine_process found"; exit 1; }
child="$(echo "$args" | sed -E 's/.*--host ([^ ]+).*/\1/'):$(echo "$args" | sed -E 's/.*--port ([0-9]+).*/\1/')"
say "== c=1: bare :8001, the gateway's vLLM server direct ($child), the gateway :8000"
for r in $(seq 1 "${ROUNDS:-3}"); do
  for target in 127.0.0.1:8001 "$child" 127.0.0.1:8000; do
    name=$(echo "$target" | tr ':.' '__')
    (cd /tmp && python3 -m vllm.entrypoints.cli.main bench serve --backend openai-chat --base-url "http://$target" \
      --endpoint /v1/chat/completions --model qwen3-0.6b --tokenizer /tmp/extra/model --dataset-name random \
      --random-input-len 256 --random-output-len 128 --num-prompts 32 --max-concurrency 1 --ignore-eos \
      --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 --num-warmups 4 --disable-tqdm \
      > "$raw/r${r}_$name.log" 2>&1)
    say "round $r $target $(grep -E "Median TTFT|P99 TTFT|Median TPOT" "$raw/r${r}_$name.log" \
      | awk -F: '{gsub(/ +/," ",$2); printf "%s=%s ", $1, $2}')"
  done
done
say "== the two vLLM servers and their children (engine core, API servers)"
procs() { echo "$1"; pgrep -P "$1" | while read -r c; do procs "$c"; done; }
for root in "$(cat /tmp/bare.pid)" "$(pgrep -f "[s]erve_app.engine_process" | head -1)"; do
  for pid in $(procs "$root"); do
    say "pid $pid $(ps -o ni=,comm= -p "$pid") cpus=$(python3 -c "import os,sys; print(len(os.sched_getaffinity(int(sys.argv[1]))))" "$pid")" \
      "env: $(tr '\0' '\n' < /proc/"$pid"/environ | grep -E '^(OMP|MKL|CUDA_VISIBLE|VLLM_|TORCH|PYTORCH)' | sort | tr '\n' ' ')"
  done
done
