"""/v1/r2m/* in-process (TestClient, tiny Llama RM, memory queue): streaming, bad input, versions, rollback."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.r2m import mix_weight
from rewardkit.core.scoring import reference_score
from rewardkit.core.wire import MAGIC, encode_frame, encode_stream
from rewardkit.server.app import create_app
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.r2m.protocol import FeedbackResponse, HeadList, R2MRewardResponse, R2MStatus
from rewardkit.server.settings import Settings

D_P = 12
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), max_length=64, max_batch_tokens=4096, max_body_bytes=50_000,
                        state_dir=tmp_path_factory.mktemp("state"), r2m_policy_hidden_size=D_P, r2m_d_attn=8,
                        r2m_lr=1e-2, r2m_total_rounds=10, r2m_group_size=4, r2m_max_positions=16)
    with TestClient(create_app(settings, rm=rm)) as c:
        c.rm = rm  # type: ignore[attr-defined]
        yield c


def _frames(group: str, k: int = 4, rnd: int = 5, s: int = 6, seed: int = 0, dtype: str = "float32",
            **extra: object) -> list[tuple[dict, np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [({"group_id": group, "index": i, "round": rnd, "prompt": f"Question {group}?",
              "response": f"answer {i} " * (i + 1), **extra}, rng.normal(size=(s, D_P)).astype(np.float32), dtype)
            for i in range(k)]


def _wait_version(client: TestClient, not_version: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = R2MStatus.model_validate(client.get("/v1/r2m/status").json())
        if st.active != not_version:
            return st.active
        time.sleep(0.02)
    raise AssertionError("no new head version")


def _err(resp) -> ErrorResponse:  # type: ignore[no-untyped-def]
    return ErrorResponse.model_validate(resp.json())


def test_rewards_equal_the_rm_at_round_zero_and_name_the_head(client: TestClient) -> None:
    frames = _frames("r0", rnd=0)
    r = client.post("/v1/r2m/rewards", content=encode_stream(frames), headers=OCTET)
    assert r.status_code == 200, r.text
    body = R2MRewardResponse.model_validate(r.json())
    rm = client.rm  # type: ignore[attr-defined]
    fmt = Formatter(rm.tokenizer, max_length=64)
    want = [reference_score(rm, fmt.encode(ScoreItem(prompt=h["prompt"], response=h["response"]), i))
            for i, (h, _, _) in enumerate(frames)]
    # w(0) = 1 and W_o = 0: the R2M reward is the frozen RM's reward
    assert body.rewards == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert [x.rm_reward for x in body.results] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert body.head_version.startswith("r2m-") and all(x.w == 1.0 for x in body.results)
    assert len({x.item_key for x in body.results}) == 4


def test_feedback_stream_creates_a_version_used_for_scoring_and_rollback(client: TestClient) -> None:
    start = R2MStatus.model_validate(client.get("/v1/r2m/status").json()).active
    data = encode_stream(_frames("g1", dtype="float16"))

    def chunks() -> Iterator[bytes]:  # a chunked (streamed) upload, odd chunk sizes
        for i in range(0, len(data), 777):
            yield data[i:i + 777]

    r = client.post("/v1/r2m/feedback", content=chunks(), headers=OCTET)
    assert r.status_code == 200, r.text
    fb = FeedbackResponse.model_validate(r.json())
    assert fb.accepted_frames == 4 and fb.bytes == len(data) and fb.queue == "memory"
    new = _wait_version(client, start)
    heads = HeadList.model_validate(client.get("/v1/r2m/heads").json())
    assert heads.active == new and [h.version for h in heads.heads if h.active] == [new]
    assert next(h for h in heads.heads if h.version == new).groups == 1
    frames = _frames("probe", rnd=5, seed=3)
    scored = R2MRewardResponse.model_validate(client.post("/v1/r2m/rewards", content=encode_stream(frames),
                                                          headers=OCTET).json())
    assert scored.head_version == new and scored.results[0].w == pytest.approx(mix_weight(5, 10, 0.65))
    # rollback to the start version: scoring uses it again
    r = client.post(f"/v1/r2m/heads/{start}/activate")
    assert r.status_code == 200 and HeadList.model_validate(r.json()).active == start
    again = R2MRewardResponse.model_validate(client.post("/v1/r2m/rewards", content=encode_stream(frames),
                                                         headers=OCTET).json())
    assert again.head_version == start
    assert client.post("/v1/r2m/heads/r2m-999999/activate").status_code == 404
    assert _err(client.post("/v1/r2m/heads/latest/activate")).error.type == "not_found"
    client.post(f"/v1/r2m/heads/{new}/activate")


def test_flush_applies_a_partial_group_and_refuses_a_single_member(client: TestClient) -> None:
    start = R2MStatus.model_validate(client.get("/v1/r2m/status").json()).active
    r = client.post("/v1/r2m/feedback?flush=true", content=encode_stream(_frames("fl", k=3)), headers=OCTET)
    assert r.status_code == 200, r.text
    fb = FeedbackResponse.model_validate(r.json())
    assert fb.flushed and fb.applied_groups == ["5:fl"] and fb.head_version != start
    r = client.post("/v1/r2m/feedback?flush=true", content=encode_stream(_frames("one", k=1)), headers=OCTET)
    assert r.status_code == 422
    e = _err(r).error
    assert e.field == "group_id" and "'5:one' has 1 member" in e.message


@pytest.mark.parametrize("mutate, field, kept", [
    ("dim", "header.shape", 2), ("nan", "payload", 2), ("dtype", "header.dtype", 2),
    ("truncate", "payload", 2), ("noitem", "header.item", 2), ("group_size", "header.group_size", 2),
])
def test_bad_frame_mid_stream_names_the_frame_and_keeps_earlier_frames(client: TestClient, mutate: str,
                                                                       field: str, kept: int) -> None:
    good = _frames(f"bad-{mutate}", k=4)[:2]
    body = encode_stream(good)
    h = {"group_id": f"bad-{mutate}", "index": 2, "round": 5, "prompt": "p", "response": "r"}
    arr = np.ones((3, D_P), np.float32)
    if mutate == "dim":
        bad = encode_frame(h, np.ones((3, D_P + 1), np.float32))
    elif mutate == "nan":
        raw = bytearray(encode_frame(h, arr))
        raw[-4:] = np.array([np.nan], "<f4").tobytes()
        bad = bytes(raw)
    elif mutate == "dtype":
        bad = encode_frame(h, arr).replace(b'"float32"', b'"float64"')
    elif mutate == "truncate":
        bad = encode_frame(h, arr)[:-5]
    elif mutate == "noitem":
        bad = encode_frame({k: v for k, v in h.items() if k not in ("prompt", "response")}, arr)
    else:
        bad = encode_frame({**h, "group_size": 1}, arr)
    before = R2MStatus.model_validate(client.get("/v1/r2m/status").json())
    r = client.post("/v1/r2m/feedback", content=body + bad, headers=OCTET)
    assert 400 <= r.status_code < 500, r.text
    e = _err(r).error
    assert "frame 2" in e.message and f"{kept} earlier good frames were accepted" in e.message
    assert e.field is not None and e.field.startswith(field.split(".")[0])
    # the good frames wait for their group; the updater thread reads them from the queue a moment later
    deadline = time.monotonic() + 10
    while True:
        after = R2MStatus.model_validate(client.get("/v1/r2m/status").json())
        if after.pending_frames == before.pending_frames + kept or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert after.pending_frames == before.pending_frames + kept


def test_content_type_and_empty_rewards(client: TestClient) -> None:
    assert client.post("/v1/r2m/feedback", content=MAGIC, headers={"content-type": "application/json"}
                       ).status_code == 415
    r = client.post("/v1/r2m/rewards", content=MAGIC, headers=OCTET)
    assert r.status_code == 422 and _err(r).error.field == "body"
    r = client.post("/v1/r2m/rewards", content=b"NOPE", headers=OCTET)
    assert r.status_code == 422 and _err(r).error.field == "preamble"


def test_rm_item_key_reuses_the_rm_hidden_state(client: TestClient) -> None:
    frames = _frames("keyed", rnd=5, seed=9)
    scored = R2MRewardResponse.model_validate(client.post("/v1/r2m/rewards", content=encode_stream(frames),
                                                          headers=OCTET).json())
    keyed = [({k: v for k, v in h.items() if k not in ("prompt", "response")} | {"rm_item_key": x.item_key}, a, d)
             for (h, a, d), x in zip(frames, scored.results, strict=True)]
    again = R2MRewardResponse.model_validate(client.post("/v1/r2m/rewards", content=encode_stream(keyed),
                                                         headers=OCTET).json())
    assert again.rewards == pytest.approx(scored.rewards, abs=1e-6)
    unknown = [({**keyed[0][0], "rm_item_key": "nope"}, keyed[0][1], "float32")]
    r = client.post("/v1/r2m/rewards", content=encode_stream(unknown), headers=OCTET)
    assert r.status_code == 422 and _err(r).error.field == "header.rm_item_key"


def test_long_sequences_are_pooled_to_max_positions(client: TestClient) -> None:
    frames = _frames("long", k=2, s=100)
    r = client.post("/v1/r2m/rewards", content=encode_stream(frames), headers=OCTET)
    assert r.status_code == 200 and all(np.isfinite(R2MRewardResponse.model_validate(r.json()).rewards))


def test_streams_are_exempt_from_max_body_bytes_but_bounded_by_their_own_limit(client: TestClient) -> None:
    frames = _frames("big", k=4, s=400)  # 4 x 400 x 12 x 4 bytes = 77 KB > max_body_bytes = 50 KB
    body = encode_stream(frames)
    assert len(body) > 50_000
    r = client.post("/v1/r2m/feedback", content=body, headers=OCTET)
    assert r.status_code == 200 and FeedbackResponse.model_validate(r.json()).accepted_frames == 4
    assert client.post("/v1/rewards", content=b"{" + b" " * 60_000 + b"}",
                       headers={"content-type": "application/json"}).status_code == 413  # others still limited
    r2m = client.app.state.rk.r2m  # type: ignore[attr-defined]
    old = r2m.settings.r2m_max_stream_bytes
    r2m.settings.r2m_max_stream_bytes = 10_000
    try:
        r = client.post("/v1/r2m/feedback", content=encode_stream(_frames("big2", k=4, s=100)), headers=OCTET)
    finally:
        r2m.settings.r2m_max_stream_bytes = old
    assert r.status_code == 413 and "r2m_max_stream_bytes=10000" in _err(r).error.message


def test_rewards_stream_is_refused_as_soon_as_the_frame_limit_is_passed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Issue 16 #1: /v1/r2m/rewards buffered the whole stream (2,000 frames: +500 MiB, 413 after ~1 minute) before
    counting. Now the frame past max_items_per_request is refused and the rest of the stream is never read."""
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), max_length=64, max_items_per_request=5, state_dir=tmp_path,
                        r2m_policy_hidden_size=D_P, r2m_d_attn=8, r2m_max_rewards_bytes=4096)
    frames = [encode_frame(h, a, dt, frame_index=i) for i, (h, a, dt) in
              enumerate(_frames("g", k=2) * 50)]
    consumed = 0

    async def body():  # type: ignore[no-untyped-def]
        nonlocal consumed
        yield MAGIC
        for f in frames:
            consumed += 1
            yield f

    from rewardkit.server.errors import PayloadTooLarge

    with TestClient(create_app(settings, rm=rm)) as c:  # the service itself: TestClient would buffer the body
        r2m = c.app.state.rk.r2m  # type: ignore[attr-defined]

        async def call() -> Exception | None:
            try:
                await r2m.rewards(body())
            except PayloadTooLarge as exc:
                return exc
            return None

        err = c.portal.call(call)  # type: ignore[union-attr]
        assert err is not None and "max_items_per_request=5" in err.message
        assert consumed == 6, f"{consumed} of {len(frames)} frames were read before the refusal"
        # the held-bytes limit: 6 x 12 float32 = 288 bytes a frame, 4096 bytes allowed -> refused at frame 14
        settings.max_items_per_request = 1000
        consumed = 0
        err = c.portal.call(call)  # type: ignore[union-attr]
        assert err is not None and "r2m_max_rewards_bytes=4096" in err.message
        assert consumed == 15
