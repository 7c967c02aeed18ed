"""vLLM / SGLang / OpenRLHF compatibility bodies as the 2026 trainers send them (in-process, tiny Llama)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from rewardkit.server.app import create_app
from rewardkit.server.openrlhf.protocol import GetRewardResponse
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.settings import Settings
from rewardkit.server.vllm.protocol import ClassifyResponse, EmbeddingsResponse, PoolingResponse

TEXT = "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n7 * 8 = 56.<|im_end|>\n"


def _bos_model(src: Path, dst: Path) -> Path:
    """The tiny model with a tokenizer that adds a BOS token on plain text (as Llama-3's does)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    bos = tok.token_to_id("<|im_start|>")
    tok.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.save(str(dst / "tokenizer.json"))
    return dst


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    model_dir = _bos_model(tiny_llama_dir, tmp_path_factory.mktemp("bos") / "rm")
    rm = load_reward_model(model_dir)
    settings = Settings(model=str(model_dir), max_length=64, max_items_per_request=8, max_chars_per_item=2000,
                        served_model_name=["my-rm", "org/my-rm"])
    with TestClient(create_app(settings, rm=rm)) as c:
        c.rm = rm  # type: ignore[attr-defined]
        c.model_dir = model_dir  # type: ignore[attr-defined]
        yield c


def _ref(client: TestClient, item: ScoreItem) -> float:
    rm = client.rm  # type: ignore[attr-defined]
    return reference_score(rm, Formatter(rm.tokenizer, max_length=64).encode(item))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_classify_use_activation_false_is_the_raw_score(client: TestClient) -> None:
    """Regression: vLLM >= 0.11.2's `use_activation: false` used to be ignored and the sigmoid returned."""
    raw = _ref(client, ScoreItem(text=TEXT))
    r = client.post("/classify", json={"model": "my-rm", "input": TEXT, "use_activation": False})
    assert r.status_code == 200, r.text
    assert ClassifyResponse.model_validate(r.json()).data[-1].probs[-1] == pytest.approx(raw, rel=1e-4, abs=1e-5)
    old = client.post("/classify", json={"model": "my-rm", "input": TEXT, "activation": False}).json()
    assert old["data"][0]["probs"][0] == pytest.approx(raw, rel=1e-4, abs=1e-5)
    on = client.post("/classify", json={"input": TEXT, "use_activation": True}).json()
    default = client.post("/classify", json={"input": TEXT}).json()
    assert on["data"][0]["probs"][0] == pytest.approx(_sigmoid(raw), rel=1e-4)
    assert default["data"][0]["probs"][0] == pytest.approx(_sigmoid(raw), rel=1e-4)  # vLLM's classify default


def test_pooling_activation(client: TestClient) -> None:
    raw = _ref(client, ScoreItem(text=TEXT))
    default = PoolingResponse.model_validate(client.post("/pooling", json={"input": [TEXT]}).json())
    assert default.data[0].data[0] == pytest.approx(raw, rel=1e-4, abs=1e-5)
    on = client.post("/pooling", json={"input": [TEXT], "use_activation": True}).json()
    assert on["data"][0]["data"][0] == pytest.approx(_sigmoid(raw), rel=1e-4)
    r = client.post("/pooling", json={"input": TEXT, "use_activation": True, "activation": False})
    assert r.status_code == 422 and ErrorResponse.model_validate(r.json()).error.field == "use_activation"


def test_add_special_tokens(client: TestClient) -> None:
    """This tokenizer adds a BOS on plain text; verl sends add_special_tokens=false when it put the BOS in itself."""
    with_bos = client.post("/classify", json={"input": TEXT, "use_activation": False}).json()
    without = client.post("/classify", json={"input": TEXT, "use_activation": False,
                                             "add_special_tokens": False}).json()
    assert with_bos["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"] + 1
    assert without["data"][0]["probs"][0] == pytest.approx(
        _ref(client, ScoreItem(text=TEXT, add_special_tokens=False)), rel=1e-4, abs=1e-5)
    assert with_bos["data"][0]["probs"][0] != pytest.approx(without["data"][0]["probs"][0], abs=1e-6)


def test_truncate_prompt_tokens_keeps_the_end(client: TestClient) -> None:
    r = client.post("/pooling", json={"input": TEXT, "truncate_prompt_tokens": 5}).json()
    assert r["usage"]["prompt_tokens"] == 5
    assert r["data"][0]["data"][0] == pytest.approx(_ref(client, ScoreItem(text=TEXT, keep_last_tokens=5)),
                                                    rel=1e-4, abs=1e-5)
    full = client.post("/pooling", json={"input": TEXT, "truncate_prompt_tokens": -1}).json()
    assert full["usage"]["prompt_tokens"] > 5
    assert client.post("/pooling", json={"input": TEXT, "truncate_prompt_tokens": -2}).status_code == 422


def test_request_id_echo_and_unknown_fields_ignored(client: TestClient) -> None:
    r = client.post("/classify", json={"input": "hello", "request_id": "abc-1", "normalize": None, "user": "u",
                                       "some_future_field": {"x": 1}})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "classify-abc-1" and r.headers["x-request-id"] == "abc-1"
    r = client.post("/pooling", json={"input": "hello"}, headers={"x-request-id": "from-header"})
    assert r.json()["id"] == "pool-from-header"


@pytest.mark.parametrize("body, field", [
    ({"input": [1, 2, 3]}, "input"),
    ({"input": [[1, 2], [3]]}, "input"),
    ({"input": "x", "priority": 3}, "priority"),
    ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": "x", "encoding_format": "base64"}, "encoding_format"),
])
def test_known_but_unsupported_fields_are_a_clear_422(client: TestClient, body: dict, field: str) -> None:
    for path in ("/classify", "/pooling", "/v1/embeddings"):
        if path == "/classify" and field == "encoding_format":
            continue  # /classify has no encoding_format: ignored like any unknown field
        r = client.post(path, json=body)
        assert r.status_code == 422, (path, r.text)
        err = ErrorResponse.model_validate(r.json()).error
        assert err.field is not None and err.field.startswith(field), (path, err)


def test_sglang_embeddings_last_element_is_the_raw_score(client: TestClient) -> None:
    texts = ["first text", TEXT]
    r = client.post("/v1/embeddings", json={"model": "org/my-rm", "input": texts})
    assert r.status_code == 200, r.text
    body = EmbeddingsResponse.model_validate(r.json())
    assert [d.index for d in body.data] == [0, 1]
    assert body.data[-1].embedding[-1] == pytest.approx(_ref(client, ScoreItem(text=TEXT)), rel=1e-4, abs=1e-5)


def test_every_scoring_response_names_model_and_head(client: TestClient) -> None:
    rm = client.rm  # type: ignore[attr-defined]
    calls = [("/v1/rewards", {"items": [{"text": "a"}]}), ("/get_reward", {"query": ["a"]}),
             ("/pooling", {"input": "a"}), ("/classify", {"input": "a"}), ("/v1/embeddings", {"input": "a"}),
             ("/get_reward", {"query": [], "prompts": [], "labels": []})]
    for path, body in calls:
        r = client.post(path, json=body)
        assert r.status_code == 200, (path, r.text)
        assert r.headers["x-rewardkit-model"] == rm.model_id, path
        assert r.headers["x-rewardkit-head-version"] == rm.head_version, path


def test_openrlhf_empty_shard(client: TestClient) -> None:
    r = client.post("/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200
    assert GetRewardResponse.model_validate(r.json()) == GetRewardResponse(rewards=[], scores=[],
                                                                           extra_logs={"rm_score": []})


def test_model_names_a_client_may_send(client: TestClient) -> None:
    model_dir = client.model_dir  # type: ignore[attr-defined]
    for name in (client.rm.model_id, str(model_dir), str(model_dir) + "/", "my-rm", "org/my-rm", "default"):  # type: ignore[attr-defined]
        assert client.post("/classify", json={"model": name, "input": "a"}).status_code == 200, name
    r = client.post("/classify", json={"model": "x", "input": "a"})
    assert r.status_code == 422
    err = ErrorResponse.model_validate(r.json()).error
    assert err.field == "model" and "my-rm" in err.message and "--served-model-name" in err.message


def test_compat_endpoints_answer_503_while_the_model_cannot_serve(tmp_path: Path) -> None:
    """verl retries a 5xx and never a 4xx: not-ready must be 503, so a trainer waits instead of failing."""
    settings = Settings(model=str(tmp_path / "no-such-model"))
    with TestClient(create_app(settings)) as c:
        import time

        for _ in range(100):
            if c.app.state.rk.load_error:  # type: ignore[attr-defined]
                break
            time.sleep(0.05)
        for path, body in (("/classify", {"input": "a"}), ("/pooling", {"input": "a"}),
                           ("/v1/embeddings", {"input": "a"}), ("/get_reward", {"query": ["a"]})):
            r = c.post(path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert "Retry-After" in r.headers
