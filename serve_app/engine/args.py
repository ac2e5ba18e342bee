"""Engine options as `vllm serve` would parse them, so every vLLM flag keeps its meaning and defaults."""

from __future__ import annotations

import argparse
import json
from typing import Any

# The gateway's own choices: the engine must schedule by priority (the Router sends it 0, 1 or 2), and
# vLLM's server logs no access line per request or health check (the gateway counts requests itself).
GATEWAY_ENGINE_DEFAULTS: dict[str, Any] = {"scheduling_policy": "priority", "disable_uvicorn_access_log": True}


def to_cli(options: dict[str, Any], known: set[str] | None = None) -> list[str]:
    """`{"max_model_len": 2048, "enforce_eager": True}` -> `["--max-model-len", "2048", "--enforce-eager"]`.
    `False` is `--no-<flag>` where the parser has it (`known`: its option strings); a plain on-switch such as
    `--disable-log-stats` has no negative form and is off unless given, so `False` leaves it out."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            argv.append(flag)
        elif value is False:
            negative = "--no-" + key.replace("_", "-")
            if known is None or negative in known or flag not in known:
                argv.append(negative)  # a misspelt option still reaches the parser, which names it
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(json.dumps(v) if isinstance(v, dict) else str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def _engine_flags(engine_kwargs: dict[str, Any]) -> list[str]:
    from serve_app.engine import vllm_compat

    options = {**GATEWAY_ENGINE_DEFAULTS, **engine_kwargs}
    for owned in ("model", "served_model_name", "host", "port"):  # the gateway sets these itself
        options.pop(owned, None)
    return to_cli(options, vllm_compat.serve_option_strings())


def parse_serve_args(model: str, served_model_name: str, engine_kwargs: dict[str, Any]) -> argparse.Namespace:
    """What `vllm serve` will make of the options: fails early, with vLLM's own message, on a bad one."""
    from serve_app.engine import vllm_compat

    argv = ["--model", model, "--served-model-name", served_model_name, *_engine_flags(engine_kwargs)]
    return vllm_compat.parse_serve_cli(argv)


def serve_argv(model: str, served_model_name: str, engine_kwargs: dict[str, Any], host: str, port: int) -> list[str]:
    """The arguments of vLLM's OpenAI server for one replica."""
    return [
        "--model",
        model,
        "--served-model-name",
        served_model_name,
        "--host",
        host,
        "--port",
        str(port),
        *_engine_flags(engine_kwargs),
    ]
