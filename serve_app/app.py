"""The application builder: `serve run serve_app.app:build_app` or `import_path` in a YAML config."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppArgs
from serve_app.llm_server import LLMDeployment
from serve_app.metrics_actor import MetricsDeployment
from serve_app.router import RouterDeployment


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """Router -> LLMServer replicas, with the Metrics actor beside them."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    llm = LLMDeployment.options(**args.llm.deployment_options()).bind(args.llm)
    metrics = MetricsDeployment.bind(args.otel_exporter)
    return RouterDeployment.bind(llm, metrics, args)
