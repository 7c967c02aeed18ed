"""RedisState against a real redis-server on a free port: cache, head publication, drift sharing, outages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import save as save_safetensors

from rewardkit.core.loading import load_reward_model
from rewardkit.server.app import create_app
from rewardkit.server.drift import DriftMonitor, merge_states
from rewardkit.server.settings import Settings
from rewardkit.server.state import CachedScore, HeadUpdate, RedisState, StateUnavailable, cache_key
from tests.helpers import RedisProcess, require_redis


def test_cache_key_and_value_encoding() -> None:
    assert cache_key("abc", [1, 2, 3]) == cache_key("abc", (1, 2, 3))
    assert cache_key("abc", [1, 2, 3]) != cache_key("abc", [1, 2])  # truncated ids never alias the full item
    assert cache_key("abc", [1]) != cache_key("abd", [1])
    v = CachedScore(reward=-1.25, raw_reward=0.5, num_tokens=17, truncated=True)
    assert CachedScore.from_bytes(v.to_bytes()) == v
    with pytest.raises(ValueError, match="expected 24 bytes"):
        CachedScore.from_bytes(b"short")


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="op_timeout_s"):
        RedisState("redis://127.0.0.1:1/0", op_timeout_s=0)
    with pytest.raises(ValueError, match="backoff"):
        RedisState("redis://127.0.0.1:1/0", backoff_min_s=2, backoff_max_s=1)


async def _wait(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


def _head_bytes(seed: int, hidden: int = 64) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return save_safetensors({"weight": torch.randn(1, hidden, generator=g)})


@pytest.mark.redis
def test_cache_roundtrip_ttl_and_head_isolation(redis_proc: RedisProcess) -> None:
    async def main() -> None:
        st = RedisState(redis_proc.url, namespace="t-cache", cache_ttl_s=60)
        assert await st.connect()
        k = cache_key("text", [1, 2])
        assert await st.cache_get_many("m", "h1", [k]) == [None]
        assert await st.cache_put_many("m", "h1", [(k, CachedScore(1.5, 0.5, 2, False))])
        assert await st.cache_get_many("m", "h1", [k, "other"]) == [CachedScore(1.5, 0.5, 2, False), None]
        assert await st.cache_get_many("m", "h2", [k]) == [None]  # another head version never reads it
        ttl = await st._redis().ttl(st._cache_key("m", "h1", k))
        assert 0 < ttl <= 60
        await st.close()

    asyncio.run(main())


@pytest.mark.redis
def test_head_publication_reaches_other_replica_not_itself(redis_proc: RedisProcess) -> None:
    async def main() -> None:
        a = RedisState(redis_proc.url, namespace="t-head", replica_id="a")
        b = RedisState(redis_proc.url, namespace="t-head", replica_id="b")
        got_a: list[HeadUpdate] = []
        got_b: list[HeadUpdate] = []
        a.subscribe(got_a.append)

        async def on_b(u: HeadUpdate) -> None:  # async callbacks work too
            got_b.append(u)

        b.subscribe(on_b)
        await a.connect()
        await b.connect()
        await asyncio.sleep(0.3)  # both subscribed
        w = _head_bytes(1)
        receivers = await a.publish_head("m", "v1", w, meta={"loss": 0.5})
        assert receivers == 2
        await _wait(lambda: len(got_b) == 1)
        u = got_b[0]
        assert (u.model_id, u.version, u.weights, u.origin, u.meta) == ("m", "v1", w, "a", {"loss": 0.5})
        await asyncio.sleep(0.3)
        assert got_a == []  # the publisher already holds its head
        latest = await b.fetch_head("m")
        assert latest is not None and latest.version == "v1" and latest.weights == w
        assert await b.fetch_head("unknown-model") is None
        with pytest.raises(ValueError, match="version"):
            await a.publish_head("m", "", w)
        await a.close()
        await b.close()

    asyncio.run(main())


@pytest.mark.redis
def test_late_replica_catches_up_once(redis_proc: RedisProcess) -> None:
    async def main() -> None:
        a = RedisState(redis_proc.url, namespace="t-late", replica_id="a")
        await a.connect()
        await a.publish_head("m", "v7", _head_bytes(7))
        c = RedisState(redis_proc.url, namespace="t-late", replica_id="c")
        got: list[str] = []
        c.subscribe(lambda u: got.append(u.version))
        c.track_model("m", "v0")  # what c serves from disk
        await c.connect()
        await _wait(lambda: got == ["v7"])
        await asyncio.sleep(0.3)
        assert got == ["v7"]  # delivered once
        await a.close()
        await c.close()

    asyncio.run(main())


@pytest.mark.redis
def test_fleet_drift_merges_replicas(redis_proc: RedisProcess) -> None:
    async def main() -> None:
        rng = np.random.default_rng(0)
        states = []
        for rid in ("r1", "r2"):
            mon = DriftMonitor(window=500, reference_size=100, min_samples=10)
            mon.observe(rng.normal(size=150).tolist(), rng.integers(1, 50, size=150).tolist())
            st = RedisState(redis_proc.url, namespace="t-drift", replica_id=rid, drift_sync_interval_s=5)
            await st.connect()
            await st.push_drift("m", mon.to_state())
            states.append((st, mon))
        fleet = await states[0][0].fleet_drift_states("m")
        assert sorted(fleet) == ["r1", "r2"]
        merged = DriftMonitor.from_state(merge_states(list(fleet.values())), min_samples=10).snapshot()
        assert merged.n_current == 300 and merged.n_reference == 200
        for st, _ in states:
            await st.close()

    asyncio.run(main())


@pytest.mark.redis
def test_drift_provider_pushes_every_served_model(redis_proc: RedisProcess) -> None:
    """A provider may return one (model, state) or a list (several --model): each model's window reaches Redis
    under its own key, and an empty list pushes nothing."""
    async def main() -> None:
        mons = {}
        for name, n in (("m-a", 30), ("m-b", 70)):
            mons[name] = DriftMonitor(window=500, reference_size=10, min_samples=5)
            mons[name].observe([0.1 * i for i in range(n)], [5] * n)
        provided: list[list[tuple[str, dict]]] = [[(k, m.to_state()) for k, m in mons.items()]]
        st = RedisState(redis_proc.url, namespace="t-drift-many", replica_id="r1", drift_sync_interval_s=0.01,
                        drift_provider=lambda: provided[0])
        await st.connect()
        await st._maybe_push_drift()
        for name, n in (("m-a", 30), ("m-b", 70)):
            fleet = await st.fleet_drift_states(name)
            assert DriftMonitor.from_state(merge_states(list(fleet.values()))).snapshot().n_current == n
        await st.close()

    asyncio.run(main())


@pytest.mark.redis
def test_outage_bypasses_and_reconnects(tmp_path: Path) -> None:
    require_redis()
    rp = RedisProcess(tmp_path).start()
    try:
        async def main() -> None:
            st = RedisState(rp.url, namespace="t-out", backoff_min_s=0.05, backoff_max_s=0.5)
            assert await st.connect()
            rp.kill()
            k = cache_key("x", [1])
            # the first failing operation marks Redis down; then lookups bypass without waiting on the network
            t0 = time.monotonic()
            for _ in range(3):
                assert await st.cache_get_many("m", "h", [k]) is None
                assert await st.cache_put_many("m", "h", [(k, CachedScore(1.0, 1.0, 1, False))]) is False
            assert time.monotonic() - t0 < 3.0
            assert not st.available and st.failures == 1
            with pytest.raises(StateUnavailable):
                await st.publish_head("m", "v1", b"weights")
            await asyncio.sleep(0.5)  # several failed reconnect attempts
            rp.start()  # same port, same AOF
            await _wait(lambda: st.available, timeout=10)
            assert st.reconnects == 1
            assert await st.cache_put_many("m", "h", [(k, CachedScore(2.0, 1.0, 1, False))])
            assert await st.cache_get_many("m", "h", [k]) == [CachedScore(2.0, 1.0, 1, False)]
            await st.close()

        asyncio.run(main())
    finally:
        rp.stop()


def _metric(text: str, name: str) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.mark.redis
def test_app_score_cache_hit_and_published_head(redis_proc: RedisProcess, tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), max_length=64, max_batch_tokens=4096, redis_url=redis_proc.url,
                        redis_namespace="t-app", cache_ttl_s=60)
    items = {"items": [{"prompt": "2+2?", "response": "4"}, {"prompt": "2+2?", "response": "5"}]}
    with TestClient(create_app(settings, rm=rm)) as c:
        first = c.post("/v1/rewards", json=items).json()
        m1 = c.get("/metrics").text
        assert _metric(m1, "rewardkit_cache_misses_total") == 2 and _metric(m1, "rewardkit_cache_hits_total") == 0
        assert _metric(m1, "rewardkit_redis_up") == 1
        second = c.post("/v1/rewards", json=items).json()
        assert second["rewards"] == first["rewards"]  # exactly: read back from the cache
        m2 = c.get("/metrics").text
        assert _metric(m2, "rewardkit_cache_hits_total") == 2 and _metric(m2, "rewardkit_cache_misses_total") == 2
        assert _metric(m2, "rewardkit_tokens_scored_total") == _metric(m1, "rewardkit_tokens_scored_total")

        # a head published by another replica is installed, and scores follow it
        old_version = c.get("/v1/models").json()["data"][0]["head_version"]
        weight = torch.zeros(1, rm.hidden_size)
        weight[0, 0] = 1.0

        async def publish() -> None:
            other = RedisState(redis_proc.url, namespace="t-app", replica_id="other")
            await other.connect()
            await other.publish_head(rm.model_id, "r2m-test-1", save_safetensors({"weight": weight}))
            await other.close()

        asyncio.run(publish())
        deadline = time.monotonic() + 10
        while c.get("/v1/models").json()["data"][0]["head_version"] == old_version:
            assert time.monotonic() < deadline, "head update never arrived"
            time.sleep(0.05)
        assert c.get("/v1/models").json()["data"][0]["head_version"] == "r2m-test-1"
        assert torch.equal(rm.head.weight.detach().cpu(), weight)
        third = c.post("/v1/rewards", json=items).json()
        assert third["head_version"] == "r2m-test-1"
        assert third["rewards"] != first["rewards"]  # the cache of the old head is not read
        assert _metric(c.get("/metrics").text, "rewardkit_head_swaps_total") == 1
