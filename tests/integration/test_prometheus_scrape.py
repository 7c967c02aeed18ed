"""A real Prometheus (Debian's binary) scrapes a real server process; the drift gauges come back through its API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import ServerProcess, free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _prometheus() -> str:
    exe = shutil.which("prometheus")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is required under CI=true (apt-get install -y prometheus)")
        pytest.skip("needs Debian's prometheus binary (apt-get install -y prometheus)")
    return exe


class Prometheus:
    def __init__(self, exe: str, tmp: Path, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{ROOT / 'docker' / 'prometheus' / 'alerts.rules.yml'}]\n"
            "scrape_configs:\n"
            f"  - {{job_name: rewardkit, static_configs: [{{targets: ['{target}']}}]}}\n")
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]

    def wait_value(self, expr: str, want: float, timeout: float = 40.0) -> float:
        """Poll until ``expr`` has one series equal to ``want`` (scrapes are 1 s apart)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.query(expr)
            except OSError:
                last = None
            if last and float(last[0]["value"][1]) == pytest.approx(want):
                return float(last[0]["value"][1])
            time.sleep(0.5)
        raise AssertionError(f"{expr}: never {want} (last: {last})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"REWARDKIT_DRIFT_MIN_SAMPLES": "10", "REWARDKIT_DRIFT_REFERENCE_SIZE": "40"}
    with ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("srv"), "--max-length", "128", env=env) as srv:
        yield srv


def test_prometheus_reads_drift_gauges(server: ServerProcess, tmp_path: Path) -> None:
    prom = Prometheus(_prometheus(), tmp_path, f"127.0.0.1:{server.port}")
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(10):  # 40 rewards: the automatic reference
                items = [{"prompt": f"Question {i}?", "response": "short"} for _ in range(2)] + [
                    {"prompt": f"Question {i}?", "response": f"answer {k}"} for k in range(2)]
                assert http.post("/v1/rewards", json={"items": items}).status_code == 200
            for i in range(10):  # 40 more, very different texts: the window drifts away from the reference
                items = [{"prompt": f"Tell me a story {i}", "response": "once upon a time " * (3 + k)}
                         for k in range(4)]
                assert http.post("/v1/rewards", json={"items": items}).status_code == 200
            snap = http.get("/v1/drift").json()["snapshot"]
        assert snap["n_current"] == 80 and snap["n_reference"] == 40 and snap["psi"] is not None
        model = server_model(server)
        sel = f'{{job="rewardkit",model="{model}"}}'
        prom.wait_value(f'rewardkit_drift_samples{{job="rewardkit",model="{model}",window="current"}}', 80)
        psi = prom.wait_value(f"rewardkit_drift_psi{sel}", snap["psi"])
        ks = prom.wait_value(f"rewardkit_drift_ks{sel}", snap["ks"])
        assert psi > 0 and 0 < ks <= 1
        prom.wait_value(f"rewardkit_drift_reward_length_correlation{sel}", snap["reward_length_corr"])
        prom.wait_value(f"rewardkit_drift_collapsed_group_share{sel}", snap["collapsed_group_share"])
        prom.wait_value('rewardkit_requests_total{endpoint="/v1/rewards",status="200"}', 20)
        # pinning through the API shows up in Prometheus: the window against itself has no drift
        assert httpx.post(server.url + "/v1/drift/reference/pin", timeout=10).status_code == 200
        prom.wait_value(f"rewardkit_drift_reference_pinned{sel}", 1)
        prom.wait_value(f"rewardkit_drift_psi{sel}", 0.0)
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{prom.port}/api/v1/rules", timeout=5).read())
        assert any(r["name"] == "RewardDriftPSIHigh" for g in rules["data"]["groups"] for r in g["rules"])
    finally:
        prom.stop()


def server_model(server: ServerProcess) -> str:
    return str(httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"])
