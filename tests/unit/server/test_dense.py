"""Dense (ABC) rewards over HTTP: /v1/rewards dense, caller spans, errors naming the span, /pooling token_classify."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rewardkit.core import abc
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import Scorer
from rewardkit.server.app import create_app
from rewardkit.server.native.protocol import RewardResponse
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.settings import Settings
from rewardkit.server.vllm.protocol import PoolingResponse

RESPONSE = "Hello, how are you? Ünï 🙂"


@pytest.fixture(scope="module", params=["on", "off"])
def client(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Iterator[TestClient]:
    """padding_free on: one unpadded forward per dense item; off: one padded batch (prefix sharing stays on)."""
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), max_length=48, max_items_per_request=8, max_chars_per_item=4000,
                        max_body_bytes=50_000, max_batch_tokens=4096, padding_free=request.param, max_wait_ms=20)
    with TestClient(create_app(settings, rm=rm)) as c:
        c.rm = rm  # type: ignore[attr-defined]
        yield c


def _vec(token_rewards: str | list[float]) -> np.ndarray:
    assert isinstance(token_rewards, str)
    return np.frombuffer(base64.b64decode(token_rewards), dtype="<f4")


def test_dense_rewards_match_core(client: TestClient) -> None:
    items = [{"prompt": "Say hi.", "response": RESPONSE},
             {"prompt": "Say hi.", "response": "Hi!"},  # shares the prompt: would be a prefix group if not dense
             {"text": "The quick brown fox jumps."}]
    r = client.post("/v1/rewards", json={"items": items, "dense": True, "beta": 0.7})
    assert r.status_code == 200, r.text
    body = RewardResponse.model_validate(r.json())
    rm = client.rm  # type: ignore[attr-defined]
    fmt = Formatter(rm.tokenizer, max_length=48)
    scalar = client.post("/v1/rewards", json={"items": items}).json()["rewards"]
    opts = abc.AbcOptions(beta=0.7)
    for i, (it, res) in enumerate(zip(items, body.results, strict=True)):
        assert res.dense is not None and res.dense.beta == 0.7 and res.dense.dtype == "float32"
        vec = _vec(res.dense.token_rewards)
        assert vec.sum() == pytest.approx(res.reward, abs=1e-5)
        assert res.reward == pytest.approx(scalar[i], abs=1e-5, rel=1e-4)
        enc = fmt.encode(ScoreItem(**it), i)  # type: ignore[arg-type]
        s = Scorer(rm, prefix_sharing=False).score_batch([enc], abc_layers=abc.resolve_layers(rm, opts))[0]
        d = abc.dense_rewards(enc, s, opts)
        np.testing.assert_allclose(vec, d.token_rewards, atol=1e-5)
        assert res.dense.tokens == d.tokens and [tuple(x) for x in res.dense.spans] == d.spans
        resp = enc.response
        assert all(resp[a:b] == t for (a, b), t in zip(res.dense.spans, res.dense.tokens or [], strict=True))


def test_float_encoding_and_caller_spans(client: TestClient) -> None:
    spans = [[0, 5], [5, 6], [7, 10], [11, 14], [15, 18], [18, 19], [20, 23], [24, 25]]
    assert abc.validate_spans(RESPONSE, spans, "s")
    r = client.post("/v1/rewards", json={"items": [{"prompt": "Say hi.", "response": RESPONSE,
                                                    "response_token_spans": spans}],
                                         "dense": True, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    res = RewardResponse.model_validate(r.json()).results[0]
    assert res.dense is not None and res.dense.tokens is None
    assert [list(x) for x in res.dense.spans] == spans
    assert isinstance(res.dense.token_rewards, list) and len(res.dense.token_rewards) == len(spans)
    assert sum(res.dense.token_rewards) == pytest.approx(res.reward, abs=1e-5)


@pytest.mark.parametrize("spans, bad", [
    ([[0, 5], [4, 25]], 1),                  # overlap
    ([[0, 5], [6, 30]], 1),                  # past the end of the response
    ([[0, 5], [7, 25]], 1),                  # "," (character 5) not covered
    ([[0, 5], [5, 25], [3, 4]], 2),          # runs backwards
    ([[2, 2]], 0),                           # empty
])
def test_bad_spans_are_422_naming_item_and_span(client: TestClient, spans: list[list[int]], bad: int) -> None:
    items = [{"text": "fine"}, {"prompt": "Say hi.", "response": RESPONSE, "response_token_spans": spans}]
    r = client.post("/v1/rewards", json={"items": items, "dense": True})
    assert r.status_code == 422, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert err.type == "invalid_request"
    assert err.field == f"items[1].response_token_spans[{bad}]"
    assert err.field in err.message


def test_truncated_item_still_gets_full_response_vector(client: TestClient) -> None:
    item = {"prompt": "Paris, Berlin, Madrid, Rome. " * 20, "response": "The capital of France is Paris."}
    r = client.post("/v1/rewards", json={"items": [item], "dense": True})
    assert r.status_code == 200, r.text
    res = RewardResponse.model_validate(r.json()).results[0]
    assert res.truncated and res.dense is not None
    assert "".join(res.dense.tokens or []) == item["response"]
    assert _vec(res.dense.token_rewards).sum() == pytest.approx(res.reward, abs=1e-5)


def test_pooling_token_classify_equals_rewards_dense(client: TestClient) -> None:
    texts = ["The quick brown fox jumps.", "Paris is the capital of France."]
    r = client.post("/pooling", json={"input": texts, "task": "token_classify", "beta": 0.9})
    assert r.status_code == 200, r.text
    pooled = PoolingResponse.model_validate(r.json())
    dense = RewardResponse.model_validate(client.post("/v1/rewards", json={
        "items": [{"text": t} for t in texts], "dense": True, "beta": 0.9}).json())
    for p, res in zip(pooled.data, dense.results, strict=True):
        assert res.dense is not None
        got = np.asarray(p.data, dtype=np.float32)
        assert got.shape == (len(res.dense.spans), 1)
        np.testing.assert_allclose(got[:, 0], _vec(res.dense.token_rewards), atol=1e-6)
    assert pooled.usage.total_tokens == dense.usage.total_tokens


def test_scalar_requests_unaffected(client: TestClient) -> None:
    r = client.post("/v1/rewards", json={"items": [{"prompt": "Say hi.", "response": "Hi!"}]})
    assert r.status_code == 200 and r.json()["results"][0]["dense"] is None


def test_attention_entropy_is_exported(client: TestClient) -> None:
    def count() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("rewardkit_abc_attention_entropy_count"):
                return float(line.split()[-1])
        return 0.0

    before = count()
    r = client.post("/v1/rewards", json={"items": [{"prompt": "2+2?", "response": "four, I think"}] * 3, "dense": True})
    assert r.status_code == 200
    assert count() == before + 3
