"""Engine options as `vllm serve` would parse them, so every vLLM flag keeps its meaning and defaults."""

from __future__ import annotations

import argparse
import json
from typing import Any

# The gateway's own choices: the engine must schedule by priority, and the router counts
# tokens from usage, so the final usage chunk is always requested from the engine.
GATEWAY_ENGINE_DEFAULTS: dict[str, Any] = {"scheduling_policy": "priority", "disable_log_stats": True}


def to_cli(options: dict[str, Any]) -> list[str]:
    """`{"max_model_len": 2048, "enforce_eager": True}` -> `["--max-model-len", "2048", "--enforce-eager"]`."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_serve_args(model: str, served_model_name: str, engine_kwargs: dict[str, Any]) -> argparse.Namespace:
    from serve_app import vllm_compat

    options = {**GATEWAY_ENGINE_DEFAULTS, **engine_kwargs}
    options.pop("model", None)
    options.pop("served_model_name", None)
    return vllm_compat.parse_serve_cli(["--model", model, "--served-model-name", served_model_name, *to_cli(options)])
