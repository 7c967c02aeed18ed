"""Two real server processes sharing one real redis-server: heads, cache and drift; Redis killed and restarted;
the client with both URLs carries on when one server dies."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from rewardkit.client import RewardClient
from rewardkit.server.state import RedisState
from tests.helpers import RedisProcess, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.redis]

NS = "it-replicas"


@pytest.fixture(scope="module")
def servers(tiny_llama_dir: Path, redis_proc: RedisProcess, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[list[ServerProcess]]:
    tmp = tmp_path_factory.mktemp("replicas")
    out = []
    for name in ("a", "b"):
        env = {"REWARDKIT_REDIS_URL": redis_proc.url, "REWARDKIT_REDIS_NAMESPACE": NS, "REWARDKIT_REPLICA_ID": name,
               "REWARDKIT_DRIFT_SYNC_INTERVAL_S": "0.5", "REWARDKIT_DRIFT_MIN_SAMPLES": "10"}
        out.append(ServerProcess(tiny_llama_dir, tmp, "--max-length", "128", env=env))
    for s in out:
        s.start()
    yield out
    for s in out:
        s.stop()


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return float(s.value)
    raise KeyError(name)


def head_version(url: str) -> str:
    return str(httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["head_version"])


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def publish(url: str, model_id: str, version: str, weights: bytes) -> None:
    async def main() -> None:
        st = RedisState(url, namespace=NS, replica_id="trainer")
        assert await st.connect()
        await st.publish_head(model_id, version, weights)
        await st.close()

    asyncio.run(main())


def test_head_published_reaches_both_replicas(servers: list[ServerProcess], redis_proc: RedisProcess) -> None:
    a, b = servers
    item = {"items": [{"prompt": "What is 3+4?", "response": "7"}]}
    before = [httpx.post(s.url + "/v1/rewards", json=item, timeout=30).json()["rewards"][0] for s in servers]
    assert before[0] == pytest.approx(before[1], rel=1e-5)
    model = httpx.get(a.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    g = torch.Generator().manual_seed(3)
    publish(redis_proc.url, model, "r2m-it-1", save_safetensors({"weight": torch.randn(1, 64, generator=g)}))
    wait_until(lambda: head_version(a.url) == head_version(b.url) == "r2m-it-1", what="head on both replicas")
    after = [httpx.post(s.url + "/v1/rewards", json=item, timeout=30).json() for s in servers]
    assert after[0]["head_version"] == after[1]["head_version"] == "r2m-it-1"
    assert after[0]["rewards"][0] == pytest.approx(after[1]["rewards"][0], rel=1e-5)
    assert after[0]["rewards"][0] != pytest.approx(before[0], rel=1e-3)
    assert metric(a.url, "rewardkit_head_swaps_total") == 1 == metric(b.url, "rewardkit_head_swaps_total")


def test_fleet_drift_pools_both_replicas(servers: list[ServerProcess]) -> None:
    a, b = servers
    n_before = [httpx.get(s.url + "/v1/drift", timeout=10).json()["snapshot"]["n_current"] for s in servers]
    for s, n in ((a, 3), (b, 5)):
        for i in range(n):
            items = [{"prompt": f"p{i}", "response": f"r{k}"} for k in range(4)]
            assert httpx.post(s.url + "/v1/rewards", json={"items": items}, timeout=30).status_code == 200
    want = sum(n_before) + 4 * (3 + 5)

    def fleet_n() -> int:
        d = httpx.get(a.url + "/v1/drift", params={"scope": "fleet"}, timeout=10).json()
        return int(d["snapshot"]["n_current"]) if d["replicas"] == 2 else -1

    wait_until(lambda: fleet_n() == want, timeout=10, what=f"fleet window of {want}")  # b pushes every 0.5 s


def test_fleet_run_drift_pools_the_run_across_replicas(servers: list[ServerProcess]) -> None:
    """A run scored on both replicas: ``run=...&scope=fleet`` on either pools its two windows; a run scored on b
    only is found from a; an unknown run is a 404 naming ``run``."""
    a, b = servers
    tag = f"fleet/run-{time.time_ns()}"
    for s, n in ((a, 10), (b, 7)):
        items = [{"prompt": "p", "response": f"r{k}"} for k in range(n)]
        r = httpx.post(s.url + "/v1/rewards", json={"items": items}, headers={"x-rewardkit-run": tag}, timeout=30)
        assert r.status_code == 200, r.text
    only_b = tag + "-b"
    assert httpx.post(b.url + "/v1/rewards", json={"items": [{"text": "x"}]}, headers={"x-rewardkit-run": only_b},
                      timeout=30).status_code == 200

    def fleet(url: str, run: str) -> tuple[int, int]:
        r = httpx.get(url + "/v1/drift", params={"run": run, "scope": "fleet"}, timeout=10)
        d = r.json()
        return (int(d["snapshot"]["n_current"]), int(d["replicas"])) if r.status_code == 200 else (-1, r.status_code)

    wait_until(lambda: fleet(a.url, tag) == (17, 2), timeout=10, what="the run's pooled window")  # b pushes every 0.5 s
    assert fleet(b.url, tag) == (17, 2)
    assert httpx.get(a.url + "/v1/drift", params={"run": tag}, timeout=10).json()["snapshot"]["n_current"] == 10
    wait_until(lambda: fleet(a.url, only_b) == (1, 1), timeout=10, what="b's run seen from a")
    r = httpx.get(a.url + "/v1/drift", params={"run": tag + "-none", "scope": "fleet"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["field"] == "run"


def test_redis_killed_and_restarted(servers: list[ServerProcess], redis_proc: RedisProcess) -> None:
    a, _ = servers
    stop = threading.Event()
    codes: list[int] = []

    def traffic() -> None:
        i = 0
        with httpx.Client(base_url=a.url, timeout=30) as http:
            while not stop.is_set():
                codes.append(http.post("/v1/rewards", json={"items": [{"text": f"load {i}"}]}).status_code)
                i += 1

    # acknowledged before the kill: a cache entry (Redis runs append-only with fsync always)
    before_kill = {"items": [{"text": f"before kill {time.time()}"}]}
    kept = httpx.post(a.url + "/v1/rewards", json=before_kill, timeout=30).json()["rewards"]
    t = threading.Thread(target=traffic)
    t.start()
    try:
        time.sleep(0.5)
        redis_proc.kill()  # SIGKILL mid-run
        wait_until(lambda: metric(a.url, "rewardkit_redis_up") == 0, what="redis_up 0")
        n_down = len(codes)
        time.sleep(1.0)
        assert len(codes) > n_down, "server stopped serving while Redis was down"
        redis_proc.start()  # same port, same append-only file
        wait_until(lambda: metric(a.url, "rewardkit_redis_up") == 1, what="reconnect")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    assert codes and set(codes) == {200}, f"non-200 answers during the outage: {set(codes)}"
    assert metric(a.url, "rewardkit_redis_reconnects_total") >= 1
    # a cache entry written after the restart is read back
    item = {"items": [{"text": f"after restart {time.time()}"}]}
    hits = metric(a.url, "rewardkit_cache_hits_total")
    first = httpx.post(a.url + "/v1/rewards", json=item, timeout=30).json()["rewards"]
    second = httpx.post(a.url + "/v1/rewards", json=item, timeout=30).json()["rewards"]
    assert first == second and metric(a.url, "rewardkit_cache_hits_total") == hits + 1
    # what Redis acknowledged before the kill survived it
    hits = metric(a.url, "rewardkit_cache_hits_total")
    assert httpx.post(a.url + "/v1/rewards", json=before_kill, timeout=30).json()["rewards"] == kept
    assert metric(a.url, "rewardkit_cache_hits_total") == hits + 1


def test_client_carries_on_when_one_replica_dies(servers: list[ServerProcess]) -> None:
    a, b = servers
    texts = [f"client item {i}" for i in range(4)]
    with RewardClient([a.url, b.url], max_retries=3, timeout=30) as rk:
        want = rk.score(texts=texts)
        for _ in range(4):
            assert rk.score(texts=texts) == pytest.approx(want, rel=1e-5)
        b.signal(signal.SIGKILL)
        b.proc.wait(10)  # type: ignore[union-attr]
        for _ in range(10):
            assert rk.score(texts=texts) == pytest.approx(want, rel=1e-5)
