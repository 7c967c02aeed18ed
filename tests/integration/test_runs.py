"""Issue 24 over HTTP: two training runs share one real server process at the same time. Each names itself through
the client (``run_id``, ``step``); one drifts, the other stays steady. Each run's drift is measured against its
own start, so only the drifting run shows it (/v1/drift?run=, /metrics), while the global series stay as they
were (all traffic, one monitor)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest

from rewardkit.client import RewardClient
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow

ENV = {"REWARDKIT_DRIFT_REFERENCE_SIZE": "60", "REWARDKIT_DRIFT_WINDOW": "60", "REWARDKIT_DRIFT_MIN_SAMPLES": "20"}


def _gauge(text: str, name: str, run: str) -> float:
    m = re.search(rf'^{name}{{model="[^"]+",run="{re.escape(run)}"}} (\S+)', text, re.M)
    assert m, f"{name} for run {run} missing"
    return float(m.group(1))


def test_two_runs_at_once_drift_apart(tiny_llama_dir: Path, tmp_path: Path) -> None:
    steady = [f"ok {i}" for i in range(60)]
    moved = [f"a much longer answer that goes on and on about item number {i}" for i in range(60)]
    errors: list[BaseException] = []

    def run(name: str, second: list[str]) -> None:
        try:
            with RewardClient(srv.url, run_id=name, max_items_per_request=10) as rk:
                for step, texts in enumerate((steady, second)):
                    rk.step = step
                    rk.score(texts=texts)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    with ServerProcess(tiny_llama_dir, tmp_path, "--max-length", "64", env=ENV) as srv:
        threads = [threading.Thread(target=run, args=("team-a/steady", steady)),
                   threading.Thread(target=run, args=("team-b/drifty", moved))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        d = {r: httpx.get(srv.url + "/v1/drift", params={"run": r}).json() for r in ("team-a/steady", "team-b/drifty")}
        assert d["team-a/steady"]["snapshot"]["psi"] < 0.1 < 0.25 < d["team-b/drifty"]["snapshot"]["psi"]
        runs = {r["run"]: r for r in httpx.get(srv.url + "/v1/runs").json()["runs"]}
        assert runs["team-a/steady"]["items"] == runs["team-b/drifty"]["items"] == 120
        assert runs["team-a/steady"]["last_step"] == 1
        text = httpx.get(srv.url + "/metrics").text
        assert _gauge(text, "rewardkit_run_drift_psi", "team-b/drifty") > 0.25  # RunRewardDriftPSIHigh's condition
        assert _gauge(text, "rewardkit_run_drift_psi", "team-a/steady") < 0.1
        assert _gauge(text, "rewardkit_run_step", "team-b/drifty") == 1
        assert re.search(r"^rewardkit_drift_samples\{model=\"[^\"]+\",window=\"current\"} 60", text, re.M)
