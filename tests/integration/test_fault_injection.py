"""The fault-injection bench (issue 16) run small: Redis paused, killed and restarted empty, FLUSHALL, the head store
unwritable, the server killed with SIGKILL during updates. Every accepted group must be applied exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import require_redis

pytestmark = [pytest.mark.slow, pytest.mark.redis]
ROOT = Path(__file__).resolve().parents[2]


def test_fault_injection_loses_nothing_accepted(tmp_path: Path) -> None:
    require_redis()
    out = tmp_path / "faults.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_faults.py"), "--groups", "4", "--kills", "1",
                        "--pause-s", "1.5", "--json", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    ph = res["phases"]
    assert set(ph) == {"baseline", "redis_paused", "redis_killed", "redis_flushall", "store_unwritable",
                       "server_kill9"}
    assert res["total"].get("lost", 0) == 0 and res["total"].get("duplicated", 0) == 0
    assert res["total"]["accepted"] == res["total"]["applied"] - res["total"].get("applied_though_refused", 0)
    # while Redis is down, feedback is refused with a status, never accepted and dropped
    assert ph["redis_killed"]["refused 503"] == 4 and ph["redis_killed"]["accepted"] == 4
    # the unwritable store answered the flush with 503, and the same feedback was applied once it was back
    flushes = [e for e in res["events"] if e["phase"] == "store_unwritable" and "flush" in e["event"]]
    assert [e["status"] for e in flushes] == [503, 200]
    assert ph["store_unwritable"]["applied"] == 4
