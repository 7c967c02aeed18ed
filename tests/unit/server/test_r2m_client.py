"""FeedbackStream: what it sends (a valid RKF1 stream), batching, flush, backpressure, error surfacing, the hook."""

from __future__ import annotations

import queue
import threading

import httpx
import numpy as np
import pytest
import torch

from rewardkit.client.errors import BadRequestError
from rewardkit.client.feedback import FeedbackStream, HiddenStateCapture, to_numpy
from rewardkit.core.wire import FrameDecoder


class Recorder:
    def __init__(self, gate: threading.Event | None = None, status: int = 200) -> None:
        self.gate = gate
        self.status = status
        self.bodies: list[tuple[dict[str, str], list]] = []  # type: ignore[type-arg]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.gate is not None:
            self.gate.wait(10)
        dec = FrameDecoder()
        frames = dec.feed(request.read())
        dec.close()
        self.bodies.append((dict(request.url.params), frames))
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"type": "invalid_request", "message": "frame 0: bad",
                                                               "field": "header.shape"}})
        return httpx.Response(200, json={"accepted_frames": len(frames)})


def test_frames_batches_and_flush() -> None:
    rec = Recorder()
    fs = FeedbackStream("http://rk", transport=httpx.MockTransport(rec), batch_frames=3, dtype="float16")
    h = torch.randn(5, 8, dtype=torch.bfloat16)  # torch input, bfloat16: converted without the caller's help
    for i in range(7):
        fs.add("g", i, 2, h, {"prompt": "p", "response": f"r{i}"})
    fs.flush(complete_groups=True)
    fs.close()
    frames = [f for params, fr in rec.bodies if "flush" not in params for f in fr]
    assert [f.index for f in frames] == list(range(7)) and all(len(fr) <= 3 for _, fr in rec.bodies)
    assert frames[0].header["item"] == {"prompt": "p", "response": "r0"} and frames[0].header["dtype"] == "float16"
    np.testing.assert_allclose(frames[0].array.astype(np.float32), h.float().numpy(), rtol=1e-3)
    assert rec.bodies[-1][0] == {"flush": "true"} and rec.bodies[-1][1] == []
    assert fs.frames_sent == 7


def test_add_blocks_when_the_queue_is_full() -> None:
    gate = threading.Event()
    rec = Recorder(gate)
    fs = FeedbackStream("http://rk", transport=httpx.MockTransport(rec), batch_frames=1, max_queue=2, linger_s=0)
    h = np.ones((2, 4), np.float32)
    fs.add("g", 0, 0, h, {"text": "a"})  # taken by the sender, which blocks in the request
    deadline_ok = 0
    for i in range(1, 3):
        fs.add("g", i, 0, h, {"text": "a"}, timeout=2)
        deadline_ok += 1
    with pytest.raises(queue.Full):
        fs.add("g", 9, 0, h, {"text": "a"}, timeout=0.3)  # backpressure: the producer waits, then gives up
    gate.set()
    fs.close()
    assert deadline_ok == 2 and fs.frames_sent == 3


def test_refusals_surface_and_bad_input_raises_at_add() -> None:
    fs = FeedbackStream("http://rk", transport=httpx.MockTransport(Recorder(status=422)), batch_frames=1)
    fs.add("g", 0, 0, np.ones((2, 4), np.float32), {"text": "a"})
    with pytest.raises(BadRequestError):
        fs.flush(complete_groups=False)
    with pytest.raises(ValueError, match="NaN"):
        fs.add("g", 1, 0, np.full((2, 4), np.nan, np.float32), {"text": "a"})
    with pytest.raises(ValueError, match="item"):
        fs.add("g", 1, 0, np.ones((2, 4), np.float32))
    fs.close()
    with pytest.raises(ValueError, match="S, D"):
        to_numpy(np.ones(3))


def test_hidden_state_capture_matches_last_hidden_state() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with HiddenStateCapture(model) as cap, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    got = cap.pop()
    assert torch.allclose(got, out.hidden_states[-1])  # the final norm's output = HF's last hidden state
    rows = HiddenStateCapture.rows(got, mask)
    assert [r.shape for r in rows] == [(7, 16), (5, 16)]
    with pytest.raises(RuntimeError):
        cap.pop()


def test_reward_client_methods_use_its_url_and_key() -> None:
    from rewardkit.client import RewardClient

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"accepted_frames": 1})

    with RewardClient("http://rk:1", api_key="secret-key-123") as rk:
        fs = rk.stream_feedback(transport=httpx.MockTransport(handler), batch_frames=1)
        fs.add("g", 0, 0, np.ones((2, 4), np.float32), {"text": "a"})
        fs.close()
    assert str(seen[0].url) == "http://rk:1/v1/r2m/feedback"
    assert seen[0].headers["authorization"] == "Bearer secret-key-123"
    assert seen[0].headers["content-type"] == "application/octet-stream"


def test_async_client_offers_every_sync_method() -> None:
    from rewardkit.client import AsyncRewardClient, RewardClient

    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert public(RewardClient) - public(AsyncRewardClient) == set()


def test_feedback_fails_over_and_never_sleeps_an_unbounded_retry_after() -> None:
    import time as _time

    from rewardkit.client import RewardClient
    from rewardkit.client.errors import NotReadyError

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "a":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"accepted_frames": 1})

    with RewardClient(["http://a", "http://b"], transport=httpx.MockTransport(handler), seed=0) as rk:
        with rk.stream_feedback(batch_frames=1) as fs:
            fs.add("g", 0, 0, np.ones((2, 4), np.float32), {"text": "a"})
            fs.flush(complete_groups=False)
        assert fs.frames_sent == 1 and seen[-1] == "b"  # the frame reached the live replica

    def busy(request: httpx.Request) -> httpx.Response:  # an overloaded server asking for a 1000 s pause
        return httpx.Response(503, headers={"Retry-After": "1000"},
                              json={"error": {"type": "not_ready", "message": "busy", "field": None}})

    with RewardClient("http://c", transport=httpx.MockTransport(busy), max_retry_wait=1.0) as rk:
        fs = rk.stream_feedback(batch_frames=1)
        fs.add("g", 0, 0, np.ones((2, 4), np.float32), {"text": "a"})
        t0 = _time.monotonic()
        with pytest.raises(NotReadyError):
            fs.flush(complete_groups=False)
        assert _time.monotonic() - t0 < 5.0  # bounded by max_retry_wait, not the server's Retry-After
        fs.close()


def test_async_r2m_rewards_goes_through_the_client() -> None:
    import asyncio

    from rewardkit.client import AsyncRewardClient

    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        dec = FrameDecoder()
        n = len(dec.feed(request.read()))
        return httpx.Response(200, json={"model": "m", "head_version": "r2m-000001", "rewards": [0.5] * n,
                                         "results": []})

    async def go() -> dict:
        async with AsyncRewardClient("http://rk", api_key="k-123", transport=httpx.MockTransport(handler)) as rk:
            return await rk.r2m_rewards(["g", "g"], [0, 1], 1, [np.ones((2, 4), np.float32)] * 2,
                                        [{"text": "a"}, {"text": "b"}], dtype="float32")

    out = asyncio.run(go())
    assert out["rewards"] == [0.5, 0.5] and out["head_version"] == "r2m-000001"
    assert seen[0].headers["authorization"] == "Bearer k-123"
    assert seen[0].headers["content-type"] == "application/octet-stream"
