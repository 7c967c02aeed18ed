"""RewardClient / AsyncRewardClient against a fake server behind httpx.MockTransport."""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import random
import time

import httpx
import numpy as np
import pytest

from rewardkit.client import (
    AsyncRewardClient,
    AuthenticationError,
    BadRequestError,
    NotReadyError,
    OverloadedError,
    ResponseFormatError,
    RewardClient,
    ServerError,
    TimeoutError,
    TransportError,
)
from rewardkit.client._base import _BaseRewardClient

from .conftest import FakeServer, error_response, fake_reward, fake_token_rewards, rewards_body

URL = "http://rm:8000"


def make(server: FakeServer, **kw) -> RewardClient:
    kw.setdefault("backoff_base", 0.001)
    kw.setdefault("seed", 0)
    return RewardClient(URL, transport=httpx.MockTransport(server), **kw)


def make_async(handler, **kw) -> AsyncRewardClient:
    kw.setdefault("backoff_base", 0.001)
    kw.setdefault("seed", 0)
    return AsyncRewardClient(URL, transport=httpx.MockTransport(handler), **kw)


# ---------------------------------------------------------------- request shapes
def test_prompts_responses_request_shape(server: FakeServer) -> None:
    with make(server) as rk:
        out = rk.score(prompts=["What is 2+2?", "Hi"], responses=["4.", "Hello there"])
    assert out == [fake_reward({"text": "What is 2+2?4."}), fake_reward({"text": "HiHello there"})]
    (req,) = server.requests
    assert req.method == "POST" and str(req.url) == URL + "/v1/rewards"
    body = json.loads(req.content)
    assert body == {
        "items": [{"prompt": "What is 2+2?", "response": "4."}, {"prompt": "Hi", "response": "Hello there"}],
        "dense": False,
    }


def test_messages_texts_and_items_request_shapes(server: FakeServer) -> None:
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    mixed = [{"text": "abc"}, {"messages": conv}, {"prompt": "p", "response": "r"}]
    with make(server, model="fake-rm") as rk:
        assert rk.score(messages=[conv]) == [fake_reward({"messages": conv})]
        assert rk.score(texts=["full text"]) == [fake_reward({"text": "full text"})]
        assert rk.score(mixed, model="other") == [fake_reward(i) for i in mixed]
    bodies = server.bodies()
    assert bodies[0] == {"items": [{"messages": conv}], "dense": False, "model": "fake-rm"}
    assert bodies[1] == {"items": [{"text": "full text"}], "dense": False, "model": "fake-rm"}
    assert bodies[2] == {"items": mixed, "dense": False, "model": "other"}


def test_dense_request_shape_and_spans(server: FakeServer) -> None:
    with make(server) as rk:
        rk.score_dense(
            prompts=["p", "q"], responses=["ab", "c"], beta=0.5, response_token_spans=[[[0, 2]], None]
        )
    (body,) = server.bodies()
    assert body["dense"] is True and body["beta"] == 0.5 and body["encoding_format"] == "base64"
    assert body["items"] == [
        {"prompt": "p", "response": "ab", "response_token_spans": [[0, 2]]},
        {"prompt": "q", "response": "c"},
    ]


def test_headers_api_key_argument_and_env(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDKIT_API_KEY", "from-env")
    with make(server) as rk:
        rk.score(texts=["x"])
    with make(server, api_key="explicit") as rk:
        rk.score(texts=["x"])
    monkeypatch.delenv("REWARDKIT_API_KEY")
    with make(server) as rk:
        rk.score(texts=["x"])
    auth = [r.headers.get("authorization") for r in server.requests]
    assert auth == ["Bearer from-env", "Bearer explicit", None]
    assert server.requests[0].headers["user-agent"].startswith("rewardkit-client/")


def test_empty_input_sends_nothing(server: FakeServer) -> None:
    with make(server) as rk:
        assert rk.score(texts=[]) == []
        assert rk.score_dense(texts=[]) == []
    assert server.requests == []


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({}, TypeError, "exactly one"),
        ({"texts": ["a"], "messages": [[{"role": "user", "content": "a"}]]}, TypeError, "exactly one"),
        ({"prompts": ["a"]}, TypeError, "together"),
        (
            {"prompts": ["a", "b"], "responses": ["a"]},
            ValueError,
            r"lengths differ \(2 prompts, 1 responses\)",
        ),
        ({"texts": "abc"}, TypeError, "texts: expected a list"),
        ({"texts": ["a", 3]}, TypeError, r"texts\[1\]"),
        ({"items": [{"text": "a"}, {"prompt": "p"}]}, ValueError, r"items\[1\]: expected keys"),
        ({"items": [{"messages": []}]}, ValueError, r"items\[0\].messages"),
        ({"messages": [[{"role": "user"}]]}, ValueError, r"items\[0\].messages\[0\]"),
    ],
)
def test_invalid_inputs_name_the_argument(server: FakeServer, kwargs, exc, match) -> None:
    with make(server) as rk, pytest.raises(exc, match=match):
        rk.score(**kwargs)
    assert server.requests == []


def test_invalid_dense_arguments(server: FakeServer) -> None:
    with make(server) as rk:
        with pytest.raises(ValueError, match="beta"):
            rk.score_dense(texts=["a"], beta=1.5)
        with pytest.raises(ValueError, match="response_token_spans: 2 entries for 1 items"):
            rk.score_dense(texts=["a"], response_token_spans=[None, None])
        with pytest.raises(ValueError, match=r"response_token_spans\[0\]\[1\]"):
            rk.score_dense(texts=["a"], response_token_spans=[[[0, 1], [3, 2]]])
    assert server.requests == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "rm:8000"}, "must start with http"),
        ({"base_url": []}, "at least one"),
        ({"base_url": ["http://a", "http://a/"]}, "duplicate"),
        ({"max_items_per_request": 0}, "max_items_per_request: must be >= 1"),
        ({"max_retries": -1}, "max_retries"),
    ],
)
def test_invalid_construction(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RewardClient(**kwargs)


def test_default_timeouts_are_bounded() -> None:
    rk = RewardClient(URL)
    assert (rk.timeout.connect, rk.timeout.read, rk.timeout.write, rk.timeout.pool) == (
        5.0,
        120.0,
        120.0,
        120.0,
    )
    assert RewardClient(URL, timeout=2).timeout.read == 2
    rk.close()


def test_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDKIT_URL", "http://a:1, http://b:2/")
    assert RewardClient().base_urls == ["http://a:1", "http://b:2"]


# ---------------------------------------------------------------- splitting
def test_split_and_reassemble_in_order(server: FakeServer) -> None:
    texts = ["x" * (i % 17) + str(i) for i in range(150)]
    with make(server, max_items_per_request=64) as rk:
        out = rk.score(texts=texts)
    assert out == [fake_reward({"text": t}) for t in texts]
    assert [len(b["items"]) for b in server.bodies()] == [64, 64, 22]


def test_async_split_concurrent_bounded_and_ordered() -> None:
    state = {"now": 0, "peak": 0, "count": 0}
    rng = random.Random(1)

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["count"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(rng.uniform(0.0, 0.03))  # later chunks often finish first
        state["now"] -= 1
        return httpx.Response(200, json=rewards_body(json.loads(request.content)))

    texts = [f"t{i}" + "y" * (i % 7) for i in range(100)]

    async def main() -> list[float]:
        async with make_async(handler, max_items_per_request=7, max_concurrency=4) as rk:
            return await rk.score(texts=texts)

    out = asyncio.run(main())
    assert out == [fake_reward({"text": t}) for t in texts]
    assert state["count"] == 15  # ceil(100 / 7)
    assert 2 <= state["peak"] <= 4


def test_async_first_failure_cancels_the_rest() -> None:
    seen: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        n = len(seen)
        seen.append(n)
        if n == 0:
            return error_response(400, "invalid_request", "bad item")
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=rewards_body(json.loads(request.content)))

    async def main() -> None:
        async with make_async(handler, max_items_per_request=1, max_concurrency=2) as rk:
            await rk.score(texts=[str(i) for i in range(10)])

    with pytest.raises(BadRequestError, match="bad item"):
        asyncio.run(main())
    assert len(seen) < 10


# ---------------------------------------------------------------- retries
def test_retry_on_429_honours_retry_after() -> None:
    server = FakeServer([error_response(429, "overloaded", "queue full", retry_after="0.2")])
    with make(server) as rk:
        t0 = time.perf_counter()
        out = rk.score(texts=["abc"])
        elapsed = time.perf_counter() - t0
    assert out == [0.3]
    assert len(server.requests) == 2
    assert 0.2 <= elapsed < 1.0


def test_retry_on_503_and_connection_error() -> None:
    server = FakeServer(
        [
            error_response(503, "not_ready", "loading"),
            httpx.ConnectError("connection refused"),
            httpx.RemoteProtocolError("server disconnected"),
        ]
    )
    with make(server) as rk:
        assert rk.score(texts=["ab"]) == [0.2]
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("status", "type_", "exc"),
    [
        (400, "invalid_request", BadRequestError),
        (401, "unauthorized", AuthenticationError),
        (422, "invalid_request", BadRequestError),
        (500, "internal", ServerError),
    ],
)
def test_no_retry_on_4xx_and_500(status, type_, exc) -> None:
    server = FakeServer([error_response(status, type_, "the server's words")] * 3)
    with make(server) as rk, pytest.raises(exc) as info:
        rk.score(texts=["a"])
    assert len(server.requests) == 1
    assert info.value.status == status and info.value.message == "the server's words"
    assert info.value.attempts == 1


def test_no_retry_on_read_timeout() -> None:
    server = FakeServer([httpx.ReadTimeout("slow")] * 3)
    with make(server) as rk, pytest.raises(TimeoutError) as info:
        rk.score(texts=["a"])
    assert len(server.requests) == 1
    assert info.value.phase == "read"
    assert isinstance(info.value, builtins.TimeoutError) and isinstance(info.value, TransportError)


def test_connect_timeout_is_retried() -> None:
    server = FakeServer([httpx.ConnectTimeout("syn lost")])
    with make(server) as rk:
        assert rk.score(texts=["a"]) == [0.1]
    assert len(server.requests) == 2


def test_max_retries_exhausted_raises_typed_error_with_message() -> None:
    server = FakeServer([error_response(429, "overloaded", "queue 512/512 full", retry_after="0")] * 10)
    with make(server, max_retries=3) as rk, pytest.raises(OverloadedError) as info:
        rk.score(texts=["a"])
    assert len(server.requests) == 4
    err = info.value
    assert (err.status, err.type, err.message, err.retry_after, err.attempts) == (
        429,
        "overloaded",
        "queue 512/512 full",
        0.0,
        4,
    )


def test_retry_after_beyond_max_retry_wait_gives_up_at_once() -> None:
    server = FakeServer([error_response(503, "not_ready", "loading model", retry_after="30")] * 2)
    with make(server, max_retry_wait=1.0) as rk, pytest.raises(NotReadyError, match="loading model"):
        t0 = time.perf_counter()
        rk.score(texts=["a"])
    assert time.perf_counter() - t0 < 0.5
    assert len(server.requests) == 1


def test_backoff_full_jitter_is_bounded() -> None:
    rk = _BaseRewardClient(
        URL, backoff_base=0.5, backoff_max=4.0, seed=3, max_retries=100, max_retry_wait=1e9
    )
    from rewardkit.client._base import _RetryState

    state = _RetryState()
    err = OverloadedError(429, "overloaded", "x")
    delays = [rk._retry_delay(state, err, rk._endpoints[0]) for _ in range(12)]
    caps = [min(4.0, 0.5 * 2**k) for k in range(12)]
    assert all(0 <= d <= c for d, c in zip(delays, caps, strict=True))
    assert max(delays[6:]) > 2.0  # the cap grew to 4 s; jitter is spread, not stuck near zero
    assert len(set(delays)) == 12


# ---------------------------------------------------------------- endpoints
def test_least_outstanding_selection() -> None:
    rk = _BaseRewardClient(["http://a:1", "http://b:1", "http://c:1"])
    a = rk._acquire(64)
    b = rk._acquire(10)
    c = rk._acquire(5)
    assert {a.url, b.url, c.url} == {"http://a:1", "http://b:1", "http://c:1"}
    assert rk._acquire(1) is c  # c carries the least work (5 items)
    rk._release(a, 64)
    assert rk._acquire(1) is a  # a is now idle
    rk._mark_dead(a)
    assert rk._acquire(1).url != a.url


def test_sequential_calls_spread_over_urls() -> None:
    servers = {"a": FakeServer(), "b": FakeServer()}
    mounts = {f"http://{k}:8000": httpx.MockTransport(s) for k, s in servers.items()}
    with RewardClient(list(mounts), http_client=httpx.Client(mounts=mounts)) as rk:
        for _ in range(6):
            rk.score(texts=["x"])
    assert [len(s.requests) for s in servers.values()] == [3, 3]


def test_async_concurrent_requests_spread_by_outstanding_items() -> None:
    hits = {"a": 0, "b": 0}
    gate = asyncio.Event()

    def handler_for(name: str):
        async def handler(request: httpx.Request) -> httpx.Response:
            hits[name] += 1
            if sum(hits.values()) == 4:
                gate.set()
            await asyncio.wait_for(gate.wait(), 2.0)  # all 4 requests are in flight together
            return httpx.Response(200, json=rewards_body(json.loads(request.content)))

        return handler

    async def main() -> list[float]:
        mounts = {f"http://{k}:8000": httpx.MockTransport(handler_for(k)) for k in hits}
        async with httpx.AsyncClient(mounts=mounts) as http:
            rk = AsyncRewardClient(list(mounts), http_client=http, max_items_per_request=5)
            return await rk.score(texts=[str(i) for i in range(20)])

    out = asyncio.run(main())
    assert out == [fake_reward({"text": str(i)}) for i in range(20)]
    assert hits == {"a": 2, "b": 2}


def test_failover_to_second_url_and_cooldown() -> None:
    dead = FakeServer([httpx.ConnectError("refused")] * 10)
    live = FakeServer()
    mounts = {"http://a:8000": httpx.MockTransport(dead), "http://b:8000": httpx.MockTransport(live)}
    with RewardClient(list(mounts), http_client=httpx.Client(mounts=mounts), failover_cooldown=60) as rk:
        t0 = time.perf_counter()
        for _ in range(4):
            assert rk.score(texts=["abc"]) == [0.3]
        assert time.perf_counter() - t0 < 0.5  # failover does not sleep
    assert len(dead.requests) == 1  # tried once, then skipped during the cooldown
    assert len(live.requests) == 4


def test_all_urls_down_raises_transport_error_after_retries() -> None:
    servers = [FakeServer([httpx.ConnectError("refused")] * 20) for _ in range(2)]
    mounts = {f"http://{k}:8000": httpx.MockTransport(s) for k, s in zip("ab", servers, strict=True)}
    with (
        RewardClient(
            list(mounts), http_client=httpx.Client(mounts=mounts), max_retries=3, backoff_base=0.001
        ) as rk,
        pytest.raises(TransportError, match="refused") as info,
    ):
        rk.score(texts=["a"])
    assert sum(len(s.requests) for s in servers) == 4
    assert info.value.attempts == 4 and not isinstance(info.value, TimeoutError)


# ---------------------------------------------------------------- dense decoding
def test_dense_base64_decoding(server: FakeServer) -> None:
    with make(server) as rk:
        (d,) = rk.score_dense(prompts=["q"], responses=["hello"])
    vec, tokens, spans = fake_token_rewards({"prompt": "q", "response": "hello"})
    assert d.reward == fake_reward({"text": "qhello"})
    assert d.token_rewards.dtype == np.float32 and d.token_rewards.flags.writeable
    np.testing.assert_array_equal(d.token_rewards, vec)  # bit-exact float32 round trip
    assert d.tokens == tokens == list("hello")
    assert d.spans.shape == (5, 2) and d.spans.tolist() == spans
    assert len(d) == 5
    assert (d.model, d.head_version) == ("fake-rm", "base")  # which model and head scored it


def test_dense_projected_on_policy_spans(server: FakeServer) -> None:
    with make(server) as rk:
        d1, d2 = rk.score_dense(
            texts=["abcdef", "xy"], response_token_spans=[[[0, 2], [2, 6]], [[0, 1], [1, 2]]]
        )
    assert d1.tokens is None and d1.spans.tolist() == [[0, 2], [2, 6]]
    np.testing.assert_array_equal(d1.token_rewards, np.float32([0.5, 1.0]))
    np.testing.assert_array_equal(d2.token_rewards, np.float32([0.25, 0.25]))


def test_dense_float_list_encoding_is_read_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        payload = json.loads(request.content)
        payload["encoding_format"] = "float"
        return httpx.Response(200, json=rewards_body(payload))

    with RewardClient(URL, transport=httpx.MockTransport(handler)) as rk:
        (d,) = rk.score_dense(texts=["abc"])
    np.testing.assert_allclose(d.token_rewards, fake_token_rewards({"text": "abc"})[0])


def test_dense_split_keeps_order(server: FakeServer) -> None:
    texts = ["a" * (i + 1) for i in range(10)]
    with make(server, max_items_per_request=3) as rk:
        dense = rk.score_dense(texts=texts)
    assert [len(d) for d in dense] == list(range(1, 11))
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b["results"][0]["dense"].update(token_rewards="***"), "not valid base64"),
        (
            lambda b: b["results"][0]["dense"].update(token_rewards=base64.b64encode(b"abcde").decode()),
            "float32",
        ),
        (lambda b: b["results"][0]["dense"].update(spans=[[0, 1]]), "token rewards but 1 spans"),
        (lambda b: b["results"][0].update(dense=None), "dense is missing"),
        (lambda b: b["rewards"].append(1.0), "sent 1 items, got 2 rewards"),
        (lambda b: b.pop("rewards"), "unexpected response shape"),
    ],
)
def test_malformed_responses_raise_response_format_error(mutate, match) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = rewards_body(json.loads(request.content))
        mutate(body)
        return httpx.Response(200, json=body)

    with (
        RewardClient(URL, transport=httpx.MockTransport(handler)) as rk,
        pytest.raises(ResponseFormatError, match=match),
    ):
        rk.score_dense(texts=["abc"])


def test_non_json_success_body() -> None:
    server = FakeServer([httpx.Response(200, text="<html>proxy</html>")])
    with make(server) as rk, pytest.raises(ResponseFormatError, match="not JSON"):
        rk.score(texts=["a"])


# ---------------------------------------------------------------- models, health, ready
def test_models_health_ready(server: FakeServer) -> None:
    with make(server) as rk:
        (info,) = rk.models()
        assert (info.id, info.head_version) == ("fake-rm", "base")
        assert rk.health() == {"status": "ok"}
        assert rk.ready() is True


def test_ready_false_on_503_and_connection_error_and_raises_otherwise() -> None:
    server = FakeServer(
        [
            error_response(503, "not_ready", "loading", retry_after="1"),
            httpx.ConnectError("refused"),
            error_response(401, "unauthorized", "bad key"),
        ]
    )
    with make(server) as rk:
        assert rk.ready() is False
        assert rk.ready() is False
        with pytest.raises(AuthenticationError, match="bad key"):
            rk.ready()
    assert len(server.requests) == 3


def test_wait_until_ready() -> None:
    server = FakeServer([error_response(503, "not_ready", "loading")] * 2)
    with make(server) as rk:
        rk.wait_until_ready(timeout=5, poll_interval=0.01)
        assert len(server.requests) == 3
    never = FakeServer([error_response(503, "not_ready", "loading")] * 100)
    with make(never) as rk, pytest.raises(TimeoutError, match="no server ready"):
        rk.wait_until_ready(timeout=0.05, poll_interval=0.01)


def test_context_manager_closes_owned_client_only(server: FakeServer) -> None:
    with make(server) as rk:
        pass
    assert rk._http.is_closed
    http = httpx.Client(transport=httpx.MockTransport(server))
    with RewardClient(URL, http_client=http):
        pass
    assert not http.is_closed
    http.close()


# ---------------------------------------------------------------- async client
def test_async_client_methods(server: FakeServer) -> None:
    async def main() -> None:
        async with make_async(server) as rk:
            assert await rk.score(prompts=["p"], responses=["rr"]) == [0.3]
            (d,) = await rk.score_dense(texts=["abcd"], response_token_spans=[[[0, 4]]])
            np.testing.assert_array_equal(d.token_rewards, np.float32([1.0]))
            assert [m.id for m in await rk.models()] == ["fake-rm"]
            assert await rk.health() == {"status": "ok"}
            assert await rk.ready() is True
        assert rk._http.is_closed

    asyncio.run(main())
    assert server.bodies()[0] == {"items": [{"prompt": "p", "response": "rr"}], "dense": False}


def test_async_retry_after_and_no_retry_on_500() -> None:
    server = FakeServer(
        [
            error_response(429, "overloaded", "full", retry_after="0.1"),
            error_response(500, "internal", "boom"),
        ]
    )

    async def main() -> float:
        async with make_async(server) as rk:
            t0 = time.perf_counter()
            with pytest.raises(ServerError, match="boom"):
                await rk.score(texts=["a"])
            return time.perf_counter() - t0

    assert 0.1 <= asyncio.run(main()) < 1.0
    assert len(server.requests) == 2


def test_run_id_and_step_travel_as_headers(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 24: the client names its run on every request; the step follows client.step."""
    from rewardkit.client import AsyncRewardClient

    rk = RewardClient(URL, transport=httpx.MockTransport(server), run_id="exp-7/seed:1")
    rk.score(texts=["a"])
    rk.step = 12
    rk.score(texts=["b"])
    h = [r.headers for r in server.requests]
    assert h[0]["x-rewardkit-run"] == "exp-7/seed:1" and "x-rewardkit-step" not in h[0]
    assert h[1]["x-rewardkit-step"] == "12"
    plain = RewardClient(URL, transport=httpx.MockTransport(server))
    plain.score(texts=["c"])
    assert "x-rewardkit-run" not in server.requests[-1].headers
    with pytest.raises(ValueError, match="run_id"):
        RewardClient(URL, run_id="has space")
    with pytest.raises(ValueError, match="needs run_id"):
        RewardClient(URL, step=3)
    with pytest.raises(ValueError, match="step"):
        rk.step = -1
    monkeypatch.setenv("REWARDKIT_RUN", "from-env")
    assert RewardClient(URL).run_id == "from-env" and AsyncRewardClient(URL).run_id == "from-env"
