#!/usr/bin/env bash
# On the GPU host, after the kit's setup.sh: does a stopped gateway give the GPU back, and does a second start work?
# For each stop method in STOPS (term: SIGTERM to `serve run`'s process group, as a supervisor does; int: SIGINT to
# it, as Ctrl-C does; shutdown: `serve shutdown -y`, then `serve run` ended with SIGINT), in turn:
#   start the gateway with CONFIG (two vLLM API servers), wait until it serves, run STREAMS streams,
#   stop it that way while they run, then every second for up to 120 s: GPU compute processes, port 8000, and
#   every process whose command line names vLLM. Then the next start, on the freed GPU.
# summary.txt: per stop, seconds until the GPU had no compute process, the port was free and no vLLM process
# was left, and whether the next start served (FINAL=0: no start after the last stop). Usage: STOPS="term shutdown" bash scripts/gpu/stop_restart.sh
. /tmp/extra/kit/env.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; CONFIG=${CONFIG:-configs/gpu-bench-qwen3-0.6b.yaml}
STOPS=${STOPS:-term shutdown}; STREAMS=${STREAMS:-8}
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
vllm_procs() { ps -eo pid,ppid,args | grep -i vllm | grep -v -e grep -e stop_restart; }
gpu_apps() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader; }
port_busy() { python3 -c 'import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(("127.0.0.1",8000)) != 0)'; }

start() {
  setsid python3 -c "import sys; from ray.serve.scripts import cli; sys.argv=['serve','run','$CONFIG']; cli()" \
    > "/tmp/gateway_$1.log" 2>&1 < /dev/null &
  echo $! > /tmp/gateway.pid
  for i in $(seq 1 90); do
    sleep 2
    curl -sf -m 2 127.0.0.1:8000/health > /dev/null && { say "start $1: serving after $((i * 2)) s"; return 0; }
    kill -0 "$(cat /tmp/gateway.pid)" 2>/dev/null || { say "start $1: serve run exited"; tail -20 "/tmp/gateway_$1.log"; return 1; }
  done
  say "start $1: not serving after 180 s"; tail -20 "/tmp/gateway_$1.log"; return 1
}

streams() {  # STREAMS long streams in the background, their status codes in /tmp/streams_$1
  for _ in $(seq 1 "$STREAMS"); do
    curl -s -m 120 -o /dev/null -w '%{http_code}\n' 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model":"qwen3-0.6b","messages":[{"role":"user","content":"hi"}],"max_tokens":4000,"ignore_eos":true,"stream":true}' \
      >> "/tmp/streams_$1" &
  done
}

stop() {  # method
  local pgid; pgid=$(cat /tmp/gateway.pid)
  case $1 in
    term) kill -TERM -- "-$pgid" ;;
    int) kill -INT -- "-$pgid" ;;
    shutdown) RAY_AUTH_MODE=token python3 -c "import sys; from ray.serve.scripts import cli; sys.argv=['serve','shutdown','-y']; cli()" \
                > "/tmp/shutdown.log" 2>&1  # the token of Ray 2.60's local cluster is sent only in that mode
              say "  serve shutdown said: $(grep -E 'SUCC|ERR' /tmp/shutdown.log | cut -c1-160)" ;;
  esac
  local t0=$SECONDS gpu="" port="" procs=""
  while [ $((SECONDS - t0)) -lt 120 ]; do
    [ -z "$gpu" ] && [ -z "$(gpu_apps)" ] && gpu=$((SECONDS - t0))
    [ -z "$port" ] && ! port_busy && port=$((SECONDS - t0))
    [ -z "$procs" ] && [ -z "$(vllm_procs)" ] && procs=$((SECONDS - t0))
    [ -n "$gpu" ] && [ -n "$port" ] && [ -n "$procs" ] && break
    sleep 1
  done
  say "stop $1: GPU free after ${gpu:-more than 120} s, port free after ${port:-more than 120} s," \
      "no vLLM process after ${procs:-more than 120} s; streams ended: $(sort /tmp/streams_$1 | uniq -c | tr '\n' ' ')"
  mkdir -p "$OUT/logs_$1" && cp /tmp/ray/session_latest/logs/serve/*LLMServer* /tmp/ray/session_latest/logs/serve/*Router* \
    "$OUT/logs_$1/" 2>/dev/null
  [ -z "$gpu" ] && say "  still on the GPU: $(gpu_apps | tr '\n' ';')"
  [ -z "$procs" ] && { say "  left running:"; vllm_procs | tee -a "$OUT/summary.txt"; }
  if [ "$1" = shutdown ]; then kill -INT -- "-$pgid"; sleep 10; fi
  ray stop --force > /dev/null 2>&1
  vllm_procs | awk '{print $1}' | xargs -r kill -9 2>/dev/null  # the next start must not fail for this one's leftovers
  sleep 3
}

say "stop_restart: $CONFIG, stops: $STOPS"
n=0
for how in $STOPS; do
  n=$((n + 1)); rm -f "/tmp/streams_$how"
  start "$n" || exit 1
  streams "$how"; sleep 5
  stop "$how"
done
[ "${FINAL:-1}" = 1 ] || { cp /tmp/gateway_*.log "$OUT/" 2>/dev/null; exit 0; }
n=$((n + 1))
start "$n" && curl -s -m 60 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"qwen3-0.6b","messages":[{"role":"user","content":"hi"}],"max_tokens":8}' -o /dev/null -w "start $n: a request got %{http_code}\n" \
  | tee -a "$OUT/summary.txt"
stop term
cp /tmp/gateway_*.log "$OUT/" 2>/dev/null
