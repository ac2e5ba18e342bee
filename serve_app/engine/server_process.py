"""The LLMServer replica's child process: `vllm serve` with the replica's options (`vllm_compat.run_serve`)."""

import sys

from serve_app.engine import vllm_compat

if __name__ == "__main__":  # vLLM's extra API servers start by spawn, which imports this module again
    vllm_compat.run_serve(sys.argv[1:])
