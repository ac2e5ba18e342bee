"""The application builder: `serve run serve_app.app:build_app` or `import_path` in a YAML config."""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from serve_app.config import AppArgs, shutdown_timeout_s
from serve_app.deployments.admission import AdmissionDeployment
from serve_app.deployments.batches import BatchesDeployment
from serve_app.deployments.llm_server import LLMDeployment
from serve_app.deployments.metrics import MetricsDeployment
from serve_app.deployments.router import ROUTER_ACTOR_OPTIONS, RouterDeployment


def build_app(args: AppArgs | dict[str, Any] | None = None) -> Application:
    """Routers -> LLMServer replicas; the Admission deployment shares queues and slots between Routers, the
    Metrics deployment collects every finished request, and the Batches deployment runs the Batch API's jobs. One parameter: `serve run` allows no other."""
    return compose_app(args, LLMDeployment)


def compose_app(args: AppArgs | dict[str, Any] | None, llm_deployment: Deployment) -> Application:
    """The graph around any LLM replica deployment: a benchmark harness puts another OpenAI server behind
    the same Routers (scripts/relay_ceiling.py)."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    if args.auth.key_file:  # read once, here; the Routers get the keys themselves
        args = args.model_copy(update={"auth": type(args.auth)(keys=args.auth.resolved())})
    drain = {"graceful_shutdown_timeout_s": shutdown_timeout_s(args.drain_timeout_s)}
    admission = AdmissionDeployment.options(**drain).bind(
        args.drain_timeout_s, args.queue, args.admission, args.replica_check_s, args.auth.rate_limits()
    )
    llm = llm_deployment.options(**args.llm.deployment_options(args.drain_timeout_s))
    llm = llm.bind(args.llm, admission, args.drain_timeout_s)
    metrics = MetricsDeployment.bind(args.otel_exporter)
    placed = (
        {"ray_actor_options": {**ROUTER_ACTOR_OPTIONS, "resources": args.router.resources}}
        if args.router.resources
        else {}
    )
    batches = BatchesDeployment.options(**drain).bind(admission, llm, metrics, args) if args.batch.enabled else None
    router = RouterDeployment.options(num_replicas=args.router.num_replicas, **drain, **placed)
    return router.bind(admission, llm, metrics, args, batches)
