"""Every vLLM-internal name the gateway uses, found where each supported vLLM release keeps it.

vLLM moves its entrypoint modules between releases (0.26 keeps the OpenAI server under
`entrypoints.openai`, 0.32 under `entrypoints.launchers`), so following a new release is one
edit here. Imports are lazy: the Router never loads vLLM.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

# Tested: 0.26 on the GPU host (its torch 2.11), 0.32 on CPU in CI; module paths checked for 0.33.
SUPPORTED_VLLM = ((0, 26), (0, 33))


# `vllm serve`'s parser: 0.33, 0.32, 0.26 (newest layout first).
CLI_ARGS_MODULES = (
    "vllm.entrypoints.common.cli_args",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.cli_args",
)


class UnsupportedVLLM(RuntimeError):
    pass


def check_version(version: str | None = None) -> str:
    """Fail at start, with the supported range in the message, rather than at the first request."""
    if version is None:
        import vllm

        version = vllm.__version__
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise UnsupportedVLLM(f"cannot read vLLM's version {version!r}") from None
    low, high = SUPPORTED_VLLM
    if not low <= (major, minor) <= high:
        raise UnsupportedVLLM(
            f"vLLM {version} is not supported: serve_app works with vLLM "
            f"{low[0]}.{low[1]} to {high[0]}.{high[1]} (pip install 'vllm>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}')"
        )
    return version


def _first(name: str, *modules: str) -> Any:
    """`name` from the first module that has it; the modules are listed newest layout first."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise UnsupportedVLLM(f"vLLM has no {name} in any of {', '.join(modules)}")


def init_app_state() -> Any:
    """`async init_app_state(engine, state, args, supported_tasks)`: builds vLLM's OpenAI serving objects."""
    return _first(
        "init_app_state",
        "vllm.entrypoints.launchers.api_server.app_state",
        "vllm.entrypoints.openai.api_server",
    )


def create_error_response() -> Any:
    """Maps an exception raised while serving a request to vLLM's ErrorResponse (status and OpenAI JSON)."""
    return _first(
        "create_error_response",
        "vllm.entrypoints.serve.exception_handling.error_response",
        "vllm.entrypoints.serve.utils.error_response",
    )


def request_models() -> tuple[type, type]:
    """(ChatCompletionRequest, CompletionRequest)."""
    chat = _first("ChatCompletionRequest", "vllm.entrypoints.openai.chat_completion.protocol")
    completion = _first("CompletionRequest", "vllm.entrypoints.openai.completion.protocol")
    return chat, completion


def parse_serve_cli(argv: list[str]) -> argparse.Namespace:
    """Parses argv exactly as `vllm serve` does, with its validation."""
    parser_cls = _first("FlexibleArgumentParser", "vllm.utils.argparse_utils")
    modules = CLI_ARGS_MODULES
    make_arg_parser = _first("make_arg_parser", *modules)
    validate = _first("validate_parsed_serve_args", *modules)
    args = make_arg_parser(parser_cls(prog="serve_app-engine")).parse_args(argv)
    validate(args)
    return args


def build_engine(args: argparse.Namespace) -> Any:
    """An AsyncLLM (v1 engine, its core in a child process) from parsed `vllm serve` args."""
    engine_args_cls = _first("AsyncEngineArgs", "vllm.engine.arg_utils")
    usage_context = _first("UsageContext", "vllm.usage.usage_lib")
    async_llm = _first("AsyncLLM", "vllm.v1.engine.async_llm")
    engine_args = engine_args_cls.from_cli_args(args)
    vllm_config = engine_args.create_engine_config(usage_context=usage_context.OPENAI_API_SERVER)
    return async_llm.from_vllm_config(
        vllm_config=vllm_config,
        usage_context=usage_context.OPENAI_API_SERVER,
        enable_log_requests=engine_args.enable_log_requests,
        disable_log_stats=engine_args.disable_log_stats,
    )


def num_unfinished(engine: Any) -> int:
    """Requests the engine still holds (0.32 has a method for it; 0.26 keeps it on the output processor)."""
    if hasattr(engine, "get_num_unfinished_requests"):
        return engine.get_num_unfinished_requests()
    return engine.output_processor.get_num_unfinished_requests()
