"""A short run of scripts/chaos_soak.py (the 30-minute soak is in docs/reliability.md): a mixed-class load on a
two-node cluster while Admission and a Router are killed in turn (the engine's and the replica's deaths are in
test_faults.py and test_orphans.py). No request is lost, no slot is leaked, and the gateway recovers from each
fault (issue 19)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "chaos_soak.py")


def test_a_short_chaos_soak_loses_no_request_and_leaks_no_slot(tmp_path):
    out = tmp_path / "chaos.json"
    argv = [SCRIPT, "--minutes", "3", "--rate", "0.5", "--faults", "admission,router", "--gap-s", "20"]
    run = subprocess.run(
        [sys.executable, *argv, "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=2400
    )
    assert out.exists(), f"no report:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    report = json.loads(out.read_text())
    print("\n" + json.dumps(report, indent=1))
    assert [fault["fault"] for fault in report["faults"][:2]] == ["admission", "router"], report["faults"]
    assert all(fault["recovered_s"] is not None for fault in report["faults"]), report["faults"]
    assert report["sent"] > 0 and report["ended"].get("ok", 0) > 0
    assert report["lost"] == 0 and report["other_status"] == 0, report["ended"]
    assert report["leaked_slots"] == 0 and report["leaked_queued"] == 0, report
    assert sum(report["ended"].values()) == report["sent"], "every request ended one way or another"
    assert run.returncode == 0, run.stdout[-2000:]
