"""Why the gateway would not take a request: the policies' exception tree.

    Refused                 a request the gateway will not run (now); each carries a Retry-After
    ├── NotReady            no LLM replica can take work yet (starting, recovering, or all draining)
    ├── QueueFull           its class's queue is at its bound
    ├── QueueTimeout        it waited its class's `max_wait_s` without a slot
    └── Shed                its predicted wait is past its class's `max_wait_s`: refused at arrival

Pure. `serve_app.errors.refusal_error` is the one place that turns them into HTTP statuses.
"""

from __future__ import annotations

from serve_app.policy.priority import Priority


class Refused(Exception):
    retry_after_s: int | None = None


class NotReady(Refused):
    retry_after_s = 5  # a replica's start or restart takes longer than this; retrying sooner only adds load


class QueueFull(Refused):
    def __init__(self, priority: Priority, retry_after_s: int) -> None:
        super().__init__(f"the {priority.label} priority queue is full")
        self.priority = priority
        self.retry_after_s = retry_after_s


class QueueTimeout(Refused):
    def __init__(self, priority: Priority, waited_s: float, retry_after_s: int) -> None:
        super().__init__(f"waited {waited_s:.1f}s in the {priority.label} priority queue without a free replica slot")
        self.priority = priority
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


class Shed(Refused):
    def __init__(self, priority: Priority, predicted_s: float, max_wait_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"the {priority.label} priority queue would take about {predicted_s:.0f}s, "
            f"more than its {max_wait_s:.0f}s bound"
        )
        self.priority = priority
        self.retry_after_s = retry_after_s
