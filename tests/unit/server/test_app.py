"""In-process API tests (FastAPI TestClient) against a tiny Llama reward model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from rewardkit.server.app import create_app
from rewardkit.server.native.protocol import ModelList, RewardResponse
from rewardkit.server.openrlhf.protocol import GetRewardResponse
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.settings import Settings
from rewardkit.server.vllm.protocol import ClassifyResponse, PoolingResponse


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path) -> Iterator[TestClient]:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), max_length=64, max_items_per_request=8, max_chars_per_item=2000,
                        max_body_bytes=50_000, max_batch_tokens=4096)
    with TestClient(create_app(settings, rm=rm)) as c:
        c.rm = rm  # type: ignore[attr-defined]
        yield c


def _err(resp) -> ErrorResponse:  # type: ignore[no-untyped-def]
    return ErrorResponse.model_validate(resp.json())


def test_rewards_match_reference(client: TestClient) -> None:
    items = [{"prompt": "What is 2+2?", "response": "4"},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there, friend"}]},
             {"text": "The capital of France is Paris."}]
    r = client.post("/v1/rewards", json={"items": items})
    assert r.status_code == 200, r.text
    body = RewardResponse.model_validate(r.json())
    rm = client.rm  # type: ignore[attr-defined]
    fmt = Formatter(rm.tokenizer, max_length=64)
    expected = [reference_score(rm, fmt.encode(ScoreItem(**(
        it if "messages" not in it else {"messages": it["messages"]})), i)) for i, it in enumerate(items)]
    assert body.rewards == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert body.model == rm.model_id and body.head_version == rm.head_version
    assert [x.index for x in body.results] == [0, 1, 2]
    assert body.usage.total_tokens == sum(x.num_tokens for x in body.results) > 0


def test_models_health_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    models = ModelList.model_validate(client.get("/v1/models").json())
    assert models.data[0].trained is True and models.data[0].max_length == 64


@pytest.mark.parametrize("payload, field", [
    ({"items": []}, "items"),
    ({}, "items"),
    ({"items": [{"prompt": "x"}]}, "items[0]"),
    ({"items": [{"text": 5}]}, "items[0].text"),
    ({"items": [{"messages": [{"role": "user", "content": "only a prompt"}]}]}, "items[0].messages"),
    ({"items": [{"text": "a"}], "beta": 2}, "beta"),
])
def test_bad_input_names_field(client: TestClient, payload: dict, field: str) -> None:
    r = client.post("/v1/rewards", json=payload)
    assert r.status_code == 422, r.text
    err = _err(r).error
    assert err.type == "invalid_request" and err.field is not None and err.field.startswith(field)


def test_empty_completion_is_scored(client: TestClient) -> None:
    """GRPO can sample an empty completion; it must get a reward, not fail the whole group."""
    r = client.post("/v1/rewards", json={"items": [{"prompt": "x", "response": ""}, {"prompt": "x", "response": "y"}]})
    assert r.status_code == 200 and len(r.json()["rewards"]) == 2


def test_limits(client: TestClient) -> None:
    r = client.post("/v1/rewards", json={"items": [{"text": "a"}] * 9})
    assert r.status_code == 413 and "max_items_per_request=8" in _err(r).error.message
    r = client.post("/v1/rewards", json={"items": [{"text": "a" * 2001}]})
    assert r.status_code == 413 and "max_chars_per_item=2000" in _err(r).error.message
    r = client.post("/v1/rewards", content=b"x" * 60_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in _err(r).error.message


def test_malformed_bodies(client: TestClient) -> None:
    for body, ctype in [(b"{not json", "application/json"), (b"\xff\xfe\x00garbage", "application/json"),
                        (b"items=1", "application/x-www-form-urlencoded")]:
        r = client.post("/v1/rewards", content=body, headers={"content-type": ctype})
        assert 400 <= r.status_code < 500, (body, r.status_code)
        assert "error" in r.json()
    # the server still serves afterwards
    assert client.post("/v1/rewards", json={"items": [{"text": "still alive"}]}).status_code == 200


def test_truncation_keeps_response_end_and_no_truncate_rejects(client: TestClient) -> None:
    long_prompt = "word " * 300
    r = client.post("/v1/rewards", json={"items": [{"prompt": long_prompt, "response": "the end"}]})
    assert r.status_code == 200
    res = RewardResponse.model_validate(r.json()).results[0]
    assert res.truncated and res.num_tokens == 64
    r = client.post("/v1/rewards", json={"items": [{"prompt": long_prompt, "response": "x"}], "truncate": False})
    assert r.status_code == 422
    err = _err(r).error
    assert err.field == "items[0]" and "max_length=64" in err.message


def test_openrlhf_get_reward(client: TestClient) -> None:
    # exactly what OpenRLHF's remote_rm_fn posts
    payload = {"query": ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
                         "plain query text"], "prompts": ["<|im_start|>user\nhi<|im_end|>\n", "plain"],
               "labels": ["", ""]}
    r = client.post("/get_reward", json=payload)
    assert r.status_code == 200, r.text
    body = GetRewardResponse.model_validate(r.json())
    native = client.post("/v1/rewards", json={"items": [{"text": q} for q in payload["query"]]}).json()["rewards"]
    assert body.rewards == pytest.approx(native, rel=1e-4, abs=1e-5) and body.scores == body.rewards
    assert client.post("/get_reward", json={"query": ["a"], "prompts": ["a", "b"]}).status_code == 422


def test_vllm_pooling_and_classify(client: TestClient) -> None:
    native = client.post("/v1/rewards", json={"items": [{"text": "one"}, {"text": "two two"}]}).json()["rewards"]
    r = client.post("/pooling", json={"model": client.rm.model_id, "input": ["one", "two two"]})  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    pooled = PoolingResponse.model_validate(r.json())
    assert [d.data[0] for d in pooled.data] == pytest.approx(native, rel=1e-4, abs=1e-5)
    r = client.post("/pooling", json={"input": "one"})
    assert PoolingResponse.model_validate(r.json()).data[0].data[0] == pytest.approx(native[0], rel=1e-4, abs=1e-5)
    # verl's reward loop: {"model", "input", "activation": false}, reads data[-1].probs[-1]
    r = client.post("/classify", json={"model": client.rm.model_id, "input": "two two", "activation": False})  # type: ignore[attr-defined]
    cls = ClassifyResponse.model_validate(r.json())
    assert cls.data[-1].probs[-1] == pytest.approx(native[1], rel=1e-4, abs=1e-5)
    r = client.post("/classify", json={"input": ["two two"]})
    import math
    assert ClassifyResponse.model_validate(r.json()).data[0].probs[0] == pytest.approx(1 / (1 + math.exp(-native[1])), rel=1e-4)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    r = client.post("/pooling", json={"messages": msgs})
    assert r.status_code == 200
    assert client.post("/pooling", json={"input": []}).status_code == 422
    assert client.post("/classify", json={"model": "other-model", "input": "x"}).status_code == 422


@pytest.mark.parametrize("path, body, hint", [
    ("/v1/rewards", {"itemz": [{"text": "a"}]}, "did you mean 'items'?"),
    ("/v1/rewards", {"items": [{"prompt": "a", "completion": "b"}]}, "did you mean 'response'?"),
    ("/v1/rewards", {"items": [{"prompt": "a", "chosen": "b", "rejected": "c"}]}, "send chosen and rejected as two items"),
    ("/get_reward", {"queries": ["a"]}, "the body has 'queries': did you mean 'query'?"),
])
def test_wrong_field_names_get_a_hint(client: TestClient, path: str, body: dict, hint: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422
    assert hint in _err(r).error.message


def test_non_json_body_is_400_naming_body(client: TestClient) -> None:
    """docs/operations.md: a body that is not JSON at all gets 400 with field `body`."""
    r = client.post("/v1/rewards", content=b'{"items": [', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = _err(r).error
    assert err.field == "body" and err.message.startswith("request body is not valid JSON at character")


def test_a_body_field_named_query_keeps_its_name(client: TestClient) -> None:
    r = client.post("/get_reward", json={"query": "not a list"})
    assert r.status_code == 422 and _err(r).error.field == "query"
