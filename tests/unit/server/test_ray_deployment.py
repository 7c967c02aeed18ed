"""The Ray Serve pieces that need no running cluster: scale options, where the R2M updater goes, the builder's
argument checks, the proxy's 503 for a request whose replica died, the replica header."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rewardkit[ray]')")

from rewardkit.server.ray_serve import proxy  # noqa: E402
from rewardkit.server.ray_serve.deployment import (  # noqa: E402
    Scale,
    app_builder,
    parse_replicas,
    replica_options,
    rewardkit_env,
    updater_wanted,
)


def test_parse_replicas() -> None:
    assert parse_replicas("auto") is None and parse_replicas(None) is None and parse_replicas(" AUTO ") is None
    assert parse_replicas("3") == 3 and parse_replicas(2) == 2
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="replicas"):
            parse_replicas(bad)


def test_scale_checks_name_the_field() -> None:
    with pytest.raises(ValueError, match="max_replicas"):
        Scale(replicas=None, min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="target_ongoing_requests"):
        Scale(target_ongoing_requests=0)
    with pytest.raises(ValueError, match="num_gpus"):
        Scale(num_gpus=-1)
    with pytest.raises(ValueError, match="min_replicas: expected a number"):
        Scale.from_args({"min_replicas": "many"})
    s = Scale.from_args({"replicas": "auto", "max_replicas": "8", "num_gpus": "1", "model": "ignored"})
    assert s.replicas is None and s.max_replicas == 8 and s.num_gpus == 1.0


def test_replica_options_fixed_and_autoscaled() -> None:
    env = {"REWARDKIT_MAX_LENGTH": "128"}
    fixed = replica_options(Scale(replicas=2, num_gpus=1, num_cpus=4), 30.0, env)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1, "runtime_env": {"env_vars": env}}
    assert fixed["graceful_shutdown_timeout_s"] == 30.0
    auto = replica_options(Scale(replicas=None, min_replicas=1, max_replicas=6, target_ongoing_requests=8), 0.0, {})
    assert "num_replicas" not in auto
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 8}
    assert auto["graceful_shutdown_timeout_s"] >= 1.0


def test_rewardkit_env_copies_only_ours() -> None:
    assert rewardkit_env({"REWARDKIT_MODEL": "m", "HOME": "/root", "RAY_ADDRESS": "x"}) == {"REWARDKIT_MODEL": "m"}


def test_updater_placement() -> None:
    redis = {"redis_url": "redis://127.0.0.1:6379/0"}
    with_updater, rep, warn = updater_wanted(redis, Scale(replicas=2))
    assert with_updater and rep["r2m_updater"] is False and warn is None  # one updater, replicas ingest
    assert updater_wanted({**redis, "r2m_updater": False}, Scale(replicas=2))[0] is False  # run elsewhere
    assert updater_wanted({}, Scale(replicas=1)) == (False, {}, None)  # one replica keeps its own, as plain serve
    with_updater, rep, warn = updater_wanted({}, Scale(replicas=None))
    assert not with_updater and rep["r2m_enabled"] is False and warn and "Redis" in warn
    assert updater_wanted({"r2m_enabled": False}, Scale(replicas=3))[0] is False


def test_app_builder_checks_args_before_any_replica() -> None:
    with pytest.raises(ValueError, match="unknown rewardkit args.*modle"):
        app_builder({"modle": "x"})
    with pytest.raises(ValueError, match="max_length"):
        app_builder({"max_length": "3"})  # Settings' own limit (>= 8), named
    with pytest.raises(ValueError, match="replicas"):
        app_builder({"replicas": "0"})
    app = app_builder({"model": "/models/rm", "replicas": "2", "redis_url": "redis://r:6379/0"})
    assert type(app).__name__ == "Application"


Message = MutableMapping[str, Any]


def _run(app: Callable[..., Awaitable[None]]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m: Message) -> None:
        sent.append(m)

    asyncio.run(proxy.ReplicaLostMiddleware(app)({"type": "http", "path": "/v1/rewards"}, receive, send))
    return sent


def test_proxy_answers_503_when_the_replica_sent_nothing() -> None:
    async def died(scope: Any, receive: Any, send: Any) -> None:
        return None  # what Serve's proxy does for a request whose replica died

    sent = _run(died)
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert b'"unavailable"' in sent[1]["body"]

    async def raised(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("actor died")

    assert _run(raised)[0]["status"] == 503


def test_proxy_passes_any_response_the_app_sent() -> None:
    async def app500(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"bug"})

    sent = _run(app500)
    assert [m.get("status") for m in sent] == [500, None] and sent[1]["body"] == b"bug"
    assert proxy.middlewares()[0].cls is proxy.ReplicaLostMiddleware
    assert proxy.CALLBACK == f"{proxy.__name__}:middlewares"


def test_every_response_names_its_replica(tiny_llama_dir: Path) -> None:
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    app = create_app(Settings(model=str(tiny_llama_dir), replica_id="rk-a", r2m_enabled=False))
    with TestClient(app) as c:
        for r in (c.get("/health"), c.get("/nope"), c.post("/v1/rewards", content=b"{bad")):
            assert r.headers["x-rewardkit-replica"] == "rk-a", r.status_code


def test_load_before_ready_raises_when_the_model_cannot_load(tmp_path: Path) -> None:
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    (tmp_path / "config.json").write_text("{}")  # a directory that is not a model
    app = create_app(Settings(model=str(tmp_path), r2m_enabled=False), load_before_ready=True)
    with pytest.raises(RuntimeError, match="could not be loaded"), TestClient(app):
        pass
