"""The gateway's processes run at the CPU priority bare `vllm serve` runs at.

Ray starts its workers at nice 15 (its `worker_niceness`), and every replica, with the vLLM server it
starts, inherits that: on a busy host the engine then loses the CPU to anything at nice 0, such as the
clients or Ray's own daemons. On an H200, vLLM's server under the gateway gave 14.0k tokens/s at nice 15
and 17.8k at nice 0 (docs/benchmarks.md). Lowering a niceness needs privileges (root or CAP_SYS_NICE);
without them, starting Ray with RAY_worker_niceness=0 in its environment does the same, as
`scripts/serve.sh` does.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("ray.serve")

NORMAL = 0


def _set(tid: int) -> bool:
    try:
        os.setpriority(os.PRIO_PROCESS, tid, NORMAL)
    except OSError:
        return False
    return True


def restore_in_child() -> None:
    """For `preexec_fn`: the child has one thread here, so whatever it starts after exec inherits nice 0."""
    _set(0)


def restore_for_process(what: str) -> None:
    """Lowers every thread of this process to nice 0 (Linux keeps a niceness per thread); warns once if
    the process may not, so that a slow replica has a stated reason."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= NORMAL:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    if not all(_set(tid) for tid in threads):
        logger.warning(
            "%s runs at nice %d, as Ray started it, and may not lower that: it will lose the CPU to busier "
            "processes. Start Ray with RAY_worker_niceness=0 in its environment (scripts/serve.sh does).",
            what,
            os.getpriority(os.PRIO_PROCESS, 0),
        )
