# Sourced by the GPU scripts: `vllm bench serve` with the benchmark's workload (random 256 in / 128 out, fixed
# output lengths), and the line of figures we report from its log.
bench_serve() {  # HOST:PORT CONCURRENCY REQUESTS LOG [more `vllm bench serve` options]
  local target=$1 conc=$2 n=$3 log=$4
  shift 4
  (cd /tmp && python3 -m vllm.entrypoints.cli.main bench serve --backend openai-chat --base-url "http://$target" \
    --endpoint /v1/chat/completions --model qwen3-0.6b --tokenizer /tmp/extra/model --dataset-name random \
    --random-input-len 256 --random-output-len 128 --num-prompts "$n" --max-concurrency "$conc" --ignore-eos \
    --percentile-metrics ttft,tpot,e2el --metric-percentiles 50,99 --num-warmups 4 --disable-tqdm "$@" > "$log" 2>&1)
}
bench_summary() {  # LOG
  grep -E "Successful requests|Output token throughput|Median TTFT|P99 TTFT|Median TPOT" "$1" \
    | awk -F: '{gsub(/ +/," ",$2); printf "%s=%s ", $1, $2}'
}
