"""The LLMServer autoscaling policy: replicas for ongoing plus queued requests, not ongoing alone.

The gateway dispatches over HTTP and holds waiting requests in its own queues, so Ray Serve's
built-in count of handle requests sees neither. Each replica reports both through
`record_autoscaling_stats`; Ray Serve applies the configured delays and bounds to our answer.
"""

from __future__ import annotations

import math
from typing import Any


def desired_replicas(ongoing: float, queued: float, target_per_replica: float, low: int, high: int) -> int:
    """Enough replicas that each holds about `target_per_replica` of all the work, within [low, high]."""
    wanted = math.ceil((ongoing + queued) / target_per_replica) if target_per_replica > 0 else low
    return max(low, min(high, wanted))


def queue_aware_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """Ray Serve custom policy (`autoscaling_config.policy.policy_function`)."""
    metrics = ctx.aggregated_metrics or {}
    if not metrics:  # no report yet (replicas starting): keep what we have
        return ctx.target_num_replicas, {}
    ongoing = sum((metrics.get("ongoing") or {}).values())
    # Every replica reports the same gateway queue; take the freshest-looking (largest) report once.
    queued = max((metrics.get("queued") or {}).values(), default=0.0)
    target = ctx.config.get_target_ongoing_requests()
    return desired_replicas(
        ongoing, queued, target, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    ), {}
