"""Several reward models in one app and composed requests (in process: two tiny models and the components)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from rewardkit.server.app import create_app
from rewardkit.server.settings import Settings

COMPONENTS = ['short=length_penalty:{"limit": 10}', 'fmt=regex:{"pattern": "\\\\\\\\boxed\\\\{"}']


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> Iterator[TestClient]:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=f"llama={tiny_llama_dir}", extra_models={"gpt2": str(tiny_gpt2_dir)},
                        components=COMPONENTS, max_length=64, max_items_per_request=8, max_chars_per_item=400)
    with TestClient(create_app(settings, rm=rm)) as c:
        c.dirs = (tiny_llama_dir, tiny_gpt2_dir)  # type: ignore[attr-defined]
        yield c


def _ref(model_dir: Path, prompt: str, response: str) -> float:
    rm = load_reward_model(model_dir)
    return float(reference_score(rm, Formatter(rm.tokenizer, max_length=64).encode(ScoreItem(prompt=prompt, response=response))))


def test_models_lists_both_models_and_the_components(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert [m["name"] for m in body["data"]] == ["llama", "gpt2"]
    comps = {c["name"]: c for c in body["components"]}
    assert set(comps) == {"short", "fmt", "exact_match", "numeric_match"}
    assert comps["short"]["config"]["limit"] == 10 and comps["numeric_match"]["needs_reference"] is True
    assert body["default_rewards"] == {}


def test_model_picks_the_model(client: TestClient) -> None:
    llama_dir, gpt2_dir = client.dirs  # type: ignore[attr-defined]
    item = {"prompt": "2+2?", "response": "4"}
    by = {m: client.post("/v1/rewards", json={"items": [item], "model": m}).json() for m in ("llama", "gpt2")}
    assert by["llama"]["rewards"][0] == pytest.approx(_ref(llama_dir, "2+2?", "4"), abs=1e-4)
    assert by["gpt2"]["rewards"][0] == pytest.approx(_ref(gpt2_dir, "2+2?", "4"), abs=1e-4)
    assert by["llama"]["rewards"][0] != pytest.approx(by["gpt2"]["rewards"][0], abs=1e-6)  # two different models
    default = client.post("/v1/rewards", json={"items": [item]}).json()
    assert default["rewards"][0] == pytest.approx(by["llama"]["rewards"][0], abs=1e-5)  # no `model`: the first
    by_path = client.post("/v1/rewards", json={"items": [item], "model": str(gpt2_dir)}).json()["rewards"]
    assert by_path[0] == pytest.approx(by["gpt2"]["rewards"][0], abs=1e-5)  # the path is a name, as vLLM clients send
    r = client.post("/v1/rewards", json={"items": [item], "model": "nosuch"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "model" and "'gpt2'" in r.json()["error"]["message"]


def test_a_composed_request_is_the_weighted_sum_of_its_parts(client: TestClient) -> None:
    items = [{"prompt": "2+2?", "response": "\\boxed{4}", "reference": "4"},
             {"prompt": "2+2?", "response": "it is five, a long answer", "reference": "4"}]
    weights = {"llama": 1.0, "gpt2": -0.5, "numeric_match": 2.0, "short": 0.3, "fmt": 0.1}
    r = client.post("/v1/rewards", json={"items": items, "rewards": weights})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "composite" and body["weights"] == weights
    assert r.headers["x-rewardkit-model"] == "composite" and r.headers["x-rewardkit-head-version"].startswith("llama:")
    solo = {m: client.post("/v1/rewards", json={"items": [{k: v for k, v in it.items() if k != "reference"}
                                                           for it in items], "model": m}).json()["rewards"]
            for m in ("llama", "gpt2")}
    for i, res in enumerate(body["results"]):
        c = res["components"]
        assert c["llama"] == pytest.approx(solo["llama"][i], abs=1e-5)
        assert c["gpt2"] == pytest.approx(solo["gpt2"][i], abs=1e-5)
        assert res["reward"] == pytest.approx(sum(w * c[n] for n, w in weights.items()), abs=1e-5)
        assert res["errors"] is None
    first, second = (res["components"] for res in body["results"])
    assert (first["numeric_match"], first["fmt"], first["short"]) == (1.0, 1.0, 0.0)
    assert (second["numeric_match"], second["fmt"]) == (0.0, 0.0)
    assert second["short"] == pytest.approx(max(-1.0, -(len(items[1]["response"]) - 10) / 10))


def test_errors_are_per_item_and_per_part(client: TestClient) -> None:
    items = [{"prompt": "q", "response": "56", "reference": "56"},
             {"prompt": "q", "response": "56"},  # no reference: numeric_match cannot score it
             {"prompt": "q", "response": "x" * 500}]  # over max_chars_per_item: the models cannot take it
    r = client.post("/v1/rewards", json={"items": items, "rewards": {"default": 1, "numeric_match": 1}})
    assert r.status_code == 200, r.text
    a, b, c = r.json()["results"]
    assert a["reward"] is not None and a["errors"] is None
    assert b["reward"] is None and set(b["errors"]) == {"numeric_match"} and "reference" in b["errors"]["numeric_match"]
    assert b["components"]["default"] is not None  # the model still scored it
    assert c["reward"] is None and "max_chars_per_item" in c["errors"]["default"]
    assert c["components"]["numeric_match"] is None and "numeric_match" in c["errors"]
    assert r.json()["rewards"] == [a["reward"], None, None]

    def errors_of(part: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(f'rewardkit_component_errors_total{{part="{part}"}}'):
                return float(line.split()[-1])
        return 0.0

    before = {p: errors_of(p) for p in ("default", "numeric_match")}
    client.post("/v1/rewards", json={"items": items, "rewards": {"default": 1, "numeric_match": 1}})
    assert errors_of("numeric_match") - before["numeric_match"] == 2  # items b and c
    assert errors_of("default") - before["default"] == 1  # item c


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"rewards": {"nosuch": 1}}, 422, "rewards.nosuch"),
    ({"rewards": {}}, 422, "rewards"),
    ({"rewards": {"default": 1, "llama": 1}}, 422, "rewards"),  # the same model twice
    ({"rewards": {"default": 1e9}}, 422, "rewards.default"),
    ({"rewards": {f"c{i}": 1 for i in range(17)}}, 413, "rewards"),
    ({"rewards": {"default": 1}, "model": "gpt2"}, 422, None),
    ({"rewards": {"default": 1}, "dense": True}, 422, None),
])
def test_bad_compositions_are_clear_4xx(client: TestClient, body: dict, status: int, field: str | None) -> None:
    r = client.post("/v1/rewards", json={"items": [{"prompt": "q", "response": "a"}], **body})
    assert r.status_code == status, r.text
    if field is not None:
        assert r.json()["error"]["field"] == field


def test_compat_endpoints_score_with_the_first_model(client: TestClient) -> None:
    llama_dir, _ = client.dirs  # type: ignore[attr-defined]
    r = client.post("/classify", json={"input": "hello", "use_activation": False})
    one = client.post("/v1/rewards", json={"items": [{"text": "hello"}]}).json()["rewards"][0]
    assert r.json()["data"][0]["probs"][0] == pytest.approx(one, abs=1e-5)
    g = client.post("/classify", json={"model": "gpt2", "input": "hello", "use_activation": False}).json()
    gpt2 = client.post("/v1/rewards", json={"items": [{"text": "hello"}], "model": "gpt2"}).json()["rewards"][0]
    assert g["data"][0]["probs"][0] == pytest.approx(gpt2, abs=1e-5)


@pytest.fixture(scope="module")
def composed_default(tiny_llama_dir: Path) -> Iterator[TestClient]:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), components=COMPONENTS, max_length=64,
                        default_rewards={"default": 1.0, "numeric_match": 2.0, "short": 0.5})
    with TestClient(create_app(settings, rm=rm)) as c:
        yield c


def test_get_reward_returns_the_default_composition_with_labels(composed_default: TestClient) -> None:
    c = composed_default
    prompts = ["<|im_start|>user\n7*8?<|im_end|>\n<|im_start|>assistant\n"] * 2
    query = [prompts[0] + "56", prompts[1] + "it is 54 I think, yes"]
    r = c.post("/get_reward", json={"query": query, "prompts": prompts, "labels": ["56", 56]})
    assert r.status_code == 200, r.text
    body = r.json()
    logs = body["extra_logs"]
    assert logs["numeric_match"] == [1.0, 0.0]
    assert logs["short"] == [0.0, pytest.approx(max(-1.0, -(len("it is 54 I think, yes") - 10) / 10))]
    rm_only = c.post("/v1/rewards", json={"items": [{"text": q} for q in query], "model": "default"}).json()
    for i in range(2):
        want = logs["default"][i] + 2.0 * logs["numeric_match"][i] + 0.5 * logs["short"][i]
        assert body["rewards"][i] == pytest.approx(want, abs=1e-5) == logs["rm_score"][i]
    assert r.headers["x-rewardkit-model"] == "composite"
    assert len(rm_only["rewards"]) == 2
    # labels missing: numeric_match cannot score, and this protocol has no per-item errors: a 422 naming the item
    r = c.post("/get_reward", json={"query": query, "prompts": prompts})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query[0]"
    assert "numeric_match" in r.json()["error"]["message"]
    # vLLM classify returns the composition too (no references there: a composition with a match part is a 422)
    assert c.post("/classify", json={"input": "x"}).status_code == 422
    assert c.get("/v1/models").json()["default_rewards"] == {"default": 1.0, "numeric_match": 2.0, "short": 0.5}
    r = c.post("/pooling", json={"input": "x", "task": "token_classify"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "task"
