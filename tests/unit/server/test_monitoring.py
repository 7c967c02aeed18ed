"""/metrics, the request-metrics middleware and the drift routes, in process (TestClient, tiny Llama)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.server.app import create_app
from rewardkit.server.ops.protocol import DriftActionResponse, DriftResponse
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.settings import Settings

KEY = "test-key-123456"


@pytest.fixture(scope="module")
def rm(tiny_llama_dir: Path) -> RewardModel:
    return load_reward_model(tiny_llama_dir)


def _settings(model_dir: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(model=str(model_dir), max_length=64, max_batch_tokens=4096, max_body_bytes=20_000,
                                   drift_min_samples=10, drift_reference_size=20, drift_window=200)
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


@pytest.fixture()
def client(tiny_llama_dir: Path, rm: RewardModel) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tiny_llama_dir), rm=rm)) as c:
        yield c


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus exposition into {(sample name, sorted labels): value}."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_expose_rewardkit_series_after_requests(client: TestClient, rm: RewardModel) -> None:
    for i in range(3):
        r = client.post("/v1/rewards", json={"items": [{"prompt": f"q{i}", "response": "a"},
                                                       {"prompt": f"q{i}", "response": "bb"}]})
        assert r.status_code == 200, r.text
    assert client.post("/v1/rewards", json={"items": []}).status_code == 422
    assert client.get("/no/such/path").status_code == 404
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    got = samples(resp.text)
    assert got[("rewardkit_requests_total", (("endpoint", "/v1/rewards"), ("status", "200")))] == 3
    assert got[("rewardkit_requests_total", (("endpoint", "/v1/rewards"), ("status", "422")))] == 1
    # unmatched paths share one label value: the raw path never becomes a label (bounded cardinality)
    assert got[("rewardkit_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert not any("/no/such/path" in str(k) for k in got)
    labels = (("head_version", rm.head_version), ("model", rm.model_id))
    assert got[("rewardkit_reward_count", labels)] == 6
    assert got[("rewardkit_drift_samples", (("model", rm.model_id), ("window", "current")))] == 6
    assert got[("rewardkit_tokens_scored_total", ())] > 0
    assert got[("rewardkit_batch_size_count", ())] >= 1
    assert got[("rewardkit_request_duration_seconds_count", (("endpoint", "/v1/rewards"),))] == 4
    assert got[("rewardkit_redis_up", ())] == 0  # no Redis configured
    assert ("rewardkit_queue_capacity", ()) in got


def test_413_is_counted(client: TestClient) -> None:
    r = client.post("/v1/rewards", content=b"x" * 30_000, headers={"content-type": "application/json"})
    assert r.status_code == 413
    got = samples(client.get("/metrics").text)
    assert got[("rewardkit_requests_total", (("endpoint", "other"), ("status", "413")))] == 1


def test_metrics_auth(tiny_llama_dir: Path, rm: RewardModel) -> None:
    for require, want in ((True, 401), (False, 200)):
        app = create_app(_settings(tiny_llama_dir, api_keys=[KEY], metrics_require_auth=require), rm=rm)
        with TestClient(app) as c:
            assert c.get("/metrics").status_code == want
            ok = c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and "rewardkit_requests_total" in ok.text
            assert c.get("/v1/drift").status_code == 401  # drift routes always follow the API key


def test_drift_routes_pin_and_reset(client: TestClient) -> None:
    r = client.post("/v1/drift/reference/pin")
    assert r.status_code == 422 and ErrorResponse.model_validate(r.json()).error.field == "reference"
    # 30 rewards: the first 20 fill the automatic reference
    for i in range(10):
        items = [{"prompt": f"question {i}", "response": "x" * (1 + k * 5)} for k in range(3)]
        assert client.post("/v1/rewards", json={"items": items}).status_code == 200
    d = DriftResponse.model_validate(client.get("/v1/drift").json())
    assert d.scope == "local" and d.replicas == 1
    snap = d.snapshot
    assert snap["n_current"] == 30 and snap["n_reference"] == 20 and snap["reference_pinned"] is False
    assert snap["n_groups"] == 10  # three completions of one prompt in one request = one group
    assert snap["psi"] is not None and snap["ks"] is not None and snap["reward_length_corr"] is not None

    pinned = DriftActionResponse.model_validate(client.post("/v1/drift/reference/pin").json())
    assert pinned.action == "pin" and pinned.replicas_notified == 0
    assert pinned.snapshot["reference_pinned"] is True and pinned.snapshot["n_reference"] == 30
    # the same window against itself: no drift
    assert pinned.snapshot["psi"] == pytest.approx(0.0, abs=1e-9) and pinned.snapshot["ks"] == pytest.approx(0.0)
    got = samples(client.get("/metrics").text)
    model = pinned.model
    assert got[("rewardkit_drift_reference_pinned", (("model", model),))] == 1
    assert got[("rewardkit_drift_psi", (("model", model),))] == pytest.approx(0.0, abs=1e-9)

    reset = DriftActionResponse.model_validate(client.post("/v1/drift/reference/reset").json())
    assert reset.snapshot["reference_pinned"] is False and reset.snapshot["n_reference"] == 0
    assert reset.snapshot["psi"] is None
    got = samples(client.get("/metrics").text)
    assert got[("rewardkit_drift_reference_pinned", (("model", model),))] == 0
    assert got[("rewardkit_drift_samples", (("model", model), ("window", "reference")))] == 0


def test_drift_fleet_scope_needs_redis(client: TestClient) -> None:
    r = client.get("/v1/drift", params={"scope": "fleet"})
    assert r.status_code == 422 and ErrorResponse.model_validate(r.json()).error.field == "scope"
    assert client.get("/v1/drift", params={"scope": "galaxy"}).status_code == 422


def test_drift_disabled(tiny_llama_dir: Path, rm: RewardModel) -> None:
    with TestClient(create_app(_settings(tiny_llama_dir, drift_enabled=False), rm=rm)) as c:
        assert c.post("/v1/rewards", json={"items": [{"text": "hello"}]}).status_code == 200
        r = c.get("/v1/drift")
        assert r.status_code == 422 and r.json()["error"]["field"] == "drift_enabled"
