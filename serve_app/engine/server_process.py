"""The LLMServer replica's child process: `vllm serve` with the replica's options (`vllm_compat.run_serve`).

Before vLLM starts, it forks a reaper, so that nothing of the server outlives the replica or the server itself:
when the replica that started the server dies (however it dies: SIGKILL from Ray, an OOM kill, a node agent
stopping) or the server's own process exits, the reaper gives vLLM `GRACE_S` to stop (on the SIGTERM it got
through PR_SET_PDEATHSIG, `llm_server._die_with_parent`), then SIGKILLs the server's whole process group: API
servers, engine core and workers. Without it, on an H200 a vLLM server that hung in its
shutdown kept its API server and engine core alive, adopted by init and holding 58.7 GB of the GPU.
"""

import os
import signal
import sys
import time

from serve_app.engine import vllm_compat

GRACE_S = 10.0
POLL_S = 0.5


def _dead(pid: int) -> bool:
    """Gone, or a zombie that its parent has not reaped yet (dead all the same)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return True
    except OSError:
        return False


def start_reaper(replica: int, grace_s: float = GRACE_S) -> int | None:
    """Forks the reaper of this process group; its pid in the caller, or None when this process does not lead
    its own group (started by something other than a replica: nothing of others' to kill)."""
    server = os.getpid()
    if os.getpgrp() != server or replica <= 1:
        return None
    pid = os.fork()
    if pid:
        return pid
    try:  # the reaper: single-threaded, before vLLM has started anything
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while not _dead(replica) and os.getppid() == server:
            time.sleep(POLL_S)
        time.sleep(grace_s)
        os.killpg(os.getpgrp(), signal.SIGKILL)  # itself last of all
    finally:
        os._exit(0)


if __name__ == "__main__":  # vLLM's extra API servers start by spawn, which imports this module again
    start_reaper(os.getppid())
    vllm_compat.run_serve(sys.argv[1:])
