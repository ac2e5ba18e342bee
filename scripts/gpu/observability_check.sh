#!/usr/bin/env bash
# On the GPU host, once ../shared/gpu's start.sh has the gateway on :8000 (and bare vLLM on :8001): checks the
# observability contract against the real vLLM there (0.26): the gateway's /metrics parses and /metrics/targets
# lists the engine, every vLLM metric that dashboards/gateway.json uses is served by that engine, and the
# dashboard's own checks pass. Writes what it read under $OUT. Usage: bash scripts/gpu/observability_check.sh
set -uo pipefail
out=${OUT:-/tmp}
gw=127.0.0.1:8000
for i in 1 2 3 4; do  # some traffic, so that every family has samples
  curl -s -m 30 "$gw/v1/chat/completions" -H 'content-type: application/json' -H "X-Priority: $([ $i = 1 ] && echo high || echo low)" \
    -d '{"model":"qwen3-0.6b","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"ignore_eos":true}' >/dev/null
done
curl -s -m 10 "$gw/metrics" > "$out/gateway_metrics.txt"
curl -s -m 10 "$gw/metrics/targets" | tee "$out/targets.json"; echo
target=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['targets'][0])" "$out/targets.json")
curl -s -m 10 "http://$target/metrics" > "$out/vllm_metrics.txt"
python3 - "$out/gateway_metrics.txt" "$out/vllm_metrics.txt" <<'EOF'
import json, re, sys
from prometheus_client.parser import text_string_to_metric_families

def names(path):
    found = set()
    for family in text_string_to_metric_families(open(path).read()):
        found.add(family.name)
        found.update(s.name for s in family.samples)
    return found

gateway, engine = names(sys.argv[1]), names(sys.argv[2])
def walk(node):
    if isinstance(node, dict):
        yield from ([node["expr"]] if isinstance(node.get("expr"), str) else [])
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)

exprs = list(walk(json.load(open("dashboards/gateway.json"))))
used = {m for e in exprs for m in re.findall(r"\b((?:gateway_|vllm:)[a-z0-9_:]+)", e)}
missing = sorted(m for m in used if m not in (gateway | engine))
print(f"gateway families+samples {len(gateway)}, engine {len(engine)}, dashboard names {len(used)}")
print("MISSING on this host:", missing or "none")
EOF
python3 -m pytest -q -p no:cacheprovider tests/test_dashboard.py -k "model or vllm_metric_names" tests/test_layers.py 2>&1 | tail -3
