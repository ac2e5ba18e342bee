"""Every shipped YAML config must pass Ray Serve's schema, our AppArgs, and vLLM's own flag parser."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve.schema import ServeDeploySchema

from serve_app.app import build_app
from serve_app.config import AppArgs, AutoscalingConfig, LLMConfig
from serve_app.engine.args import parse_serve_args, to_cli

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_cpu_and_gpu_configs():
    names = {p.name for p in CONFIGS}
    assert {"local.yaml", "gpu-qwen3-0.6b.yaml", "gpu-qwen3-vl-8b-gptq.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path: Path):
    raw = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else None
    schema = schema or ServeDeploySchema.parse_obj(raw)
    (app,) = schema.applications
    assert app.import_path == "serve_app.app:build_app"
    args = AppArgs.model_validate(app.args)
    # As `serve run` and `serve deploy` call the builder (it must take exactly one parameter); binds the
    # graph without starting anything.
    assert isinstance(call_user_app_builder_with_args_if_necessary(build_app, app.args), Application)
    options = args.llm.deployment_options()
    assert options["autoscaling_config"]["max_replicas"] >= options["autoscaling_config"]["min_replicas"]
    serve_args = parse_serve_args("/models/placeholder", args.llm.model_id, args.llm.engine_options())
    assert serve_args.scheduling_policy == "priority"
    assert raw["proxy_location"] == "Disabled" and args.http.port == 8000, "the Routers own port 8000"
    if args.llm.accelerator == "gpu":
        assert options["ray_actor_options"]["num_gpus"] == (args.llm.num_gpus or 1)
        assert args.router.num_replicas >= 2, "GPU configs scale the ingress out"
        if "bench" not in path.name:  # the benchmark config copies bare vLLM's options instead
            assert serve_args.reasoning_parser == "qwen3"
            assert serve_args.max_num_seqs and serve_args.max_num_batched_tokens
    else:
        assert options["ray_actor_options"]["num_gpus"] == 0


def test_replicas_may_share_a_gpu():
    llm = LLMConfig(accelerator="gpu", num_gpus=0.25, engine_kwargs={"gpu_memory_utilization": 0.2})
    assert llm.deployment_options()["ray_actor_options"]["num_gpus"] == 0.25
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        LLMConfig(accelerator="gpu", num_gpus=0.5, engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValueError, match="accelerator: gpu"):
        LLMConfig(num_gpus=0.5)


def test_tensor_parallel_replica_holds_all_its_gpus():
    llm = LLMConfig(accelerator="gpu", engine_kwargs={"tensor_parallel_size": 2})
    assert llm.deployment_options()["ray_actor_options"]["num_gpus"] == 2
    assert LLMConfig(accelerator="gpu").deployment_options()["ray_actor_options"]["num_gpus"] == 1
    with pytest.raises(ValueError, match="accelerator: gpu"):
        LLMConfig(engine_kwargs={"tensor_parallel_size": 2})


def test_default_model_runs_in_float32_unless_told_otherwise():
    assert LLMConfig().engine_options()["dtype"] == "float32"
    assert LLMConfig(engine_kwargs={"dtype": "bfloat16"}).engine_options()["dtype"] == "bfloat16"
    assert "dtype" not in LLMConfig(model_source="Qwen/Qwen3-0.6B").engine_options()


def test_autoscaling_defaults_stay_on_one_cpu_replica_and_bad_bounds_are_refused():
    default = AutoscalingConfig()
    assert default.min_replicas == default.max_replicas == 1, "one CPU engine already uses every core"
    assert default.target_ongoing_requests < default.max_ongoing_requests < 1000
    local = yaml.safe_load((Path(__file__).parent.parent / "configs" / "local.yaml").read_text())
    assert local["applications"][0]["args"]["llm"]["autoscaling"]["max_replicas"] == 1
    for path in CONFIGS:  # GPU configs scale: one GPU per replica
        args = AppArgs.model_validate(yaml.safe_load(path.read_text())["applications"][0]["args"])
        if args.llm.accelerator == "gpu" and "bench" not in path.name:
            assert args.llm.autoscaling.max_replicas > args.llm.autoscaling.min_replicas
    with pytest.raises(ValueError):
        AutoscalingConfig(target_ongoing_requests=32, max_ongoing_requests=32)
    with pytest.raises(ValueError):
        AutoscalingConfig(min_replicas=3, max_replicas=2)


def test_misspelt_option_is_an_error():
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"llm": {"modle_id": "x"}})


def test_engine_options_become_vllm_flags():
    argv = to_cli({"max_model_len": 2048, "enforce_eager": True, "enable_prefix_caching": False, "x": None})
    assert argv == ["--max-model-len", "2048", "--enforce-eager", "--no-enable-prefix-caching"]
    assert to_cli({"limit_mm_per_prompt": {"image": 4}}) == ["--limit-mm-per-prompt", '{"image": 4}']


def test_false_for_an_on_switch_without_a_negative_form_leaves_it_out():
    """`disable_log_stats: false` (vLLM's default, which its Prometheus metrics need) once became
    `--no-disable-log-stats`, which vLLM's parser refuses: the replica could not start."""
    from serve_app.engine import vllm_compat

    known = vllm_compat.serve_option_strings()
    assert "--disable-log-stats" in known and "--no-disable-log-stats" not in known
    assert to_cli({"disable_log_stats": False, "enable_prefix_caching": False}, known) == ["--no-enable-prefix-caching"]
    args = parse_serve_args("m", "m", {"disable_log_stats": False, "enable_prefix_caching": False})
    assert args.disable_log_stats is False and args.enable_prefix_caching is False
