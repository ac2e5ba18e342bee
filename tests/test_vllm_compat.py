"""The one module that knows where vLLM keeps its internals."""

from __future__ import annotations

import pytest

from serve_app.engine import vllm_compat


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0", "0.33.1", "0.33.0rc1"])
def test_supported_versions_pass(version):
    assert vllm_compat.check_version(version) == version


@pytest.mark.parametrize("version", ["0.25.1", "0.34.0", "1.0.0"])
def test_unsupported_versions_fail_with_the_range(version):
    with pytest.raises(vllm_compat.UnsupportedVLLM, match=r"0\.26 to 0\.33"):
        vllm_compat.check_version(version)


def test_installed_vllm_is_supported_and_every_name_resolves():
    vllm_compat.check_version()
    args = vllm_compat.parse_serve_cli(["--model", "/models/x", "--max-model-len", "512"])
    assert args.max_model_len == 512


def test_server_command_is_vllm_serve():
    import subprocess

    out = subprocess.run(vllm_compat.server_command() + ["--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--max-model-len" in out.stdout


def test_a_name_missing_everywhere_says_where_it_looked():
    with pytest.raises(vllm_compat.UnsupportedVLLM, match="no no_such_name in any of json, os"):
        vllm_compat._first("no_such_name", "json", "os")


def test_a_module_missing_from_this_layout_moves_on_to_the_next():
    assert vllm_compat._first("dumps", "no_such_package.cli_args", "json") is __import__("json").dumps


def test_a_broken_dependency_inside_a_module_is_raised_not_called_unsupported(tmp_path, monkeypatch):
    (tmp_path / "layout_with_broken_dep.py").write_text("import dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        vllm_compat._first("anything", "layout_with_broken_dep", "json")
    assert raised.value.name == "dependency_that_is_not_installed"


def test_an_engines_unfinished_requests_are_its_running_and_waiting_gauges():
    text = """# HELP vllm:num_requests_running Running.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Waiting.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:generation_tokens_total Tokens.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 99.0
"""
    assert vllm_compat.unfinished_requests(text) == 5
    assert vllm_compat.unfinished_requests("") == 0
