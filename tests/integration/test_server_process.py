"""The real server process over HTTP, driven by the real client (tiny Llama model)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rewardkit.client import AsyncRewardClient, BadRequestError, RewardClient
from rewardkit.client.adapters import make_openrlhf_reward_func, make_trl_reward_func
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("srv"), "--max-length", "128",
                       "--max-wait-ms", "10") as srv:
        yield srv


def _reference(model_dir: Path, items: list[ScoreItem]) -> list[float]:
    rm = load_reward_model(model_dir)
    fmt = Formatter(rm.tokenizer, max_length=128)
    return [reference_score(rm, fmt.encode(it, i)) for i, it in enumerate(items)]


def test_client_scores_equal_single_forward(server: ServerProcess, tiny_llama_dir: Path) -> None:
    prompts = [f"Question {i}: what is {i} + {i}?" * (1 + i % 4) for i in range(20)]
    responses = [f"The answer is {2 * i}." for i in range(20)]
    with RewardClient(server.url, max_items_per_request=7) as rk:  # forces splitting into 3 requests
        got = rk.score(prompts=prompts, responses=responses)
        assert rk.ready()
        info = rk.models()[0]
    want = _reference(tiny_llama_dir, [ScoreItem(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert info.trained is True


def test_concurrent_async_requests_are_batched_and_routed(server: ServerProcess, tiny_llama_dir: Path) -> None:
    texts = [f"item number {i} " + "pad " * (i % 13) for i in range(48)]

    async def main() -> list[float]:
        async with AsyncRewardClient(server.url) as rk:
            outs = await asyncio.gather(*(rk.score(texts=[t]) for t in texts))  # 48 concurrent single-item requests
        return [o[0] for o in outs]

    got = asyncio.run(main())
    want = _reference(tiny_llama_dir, [ScoreItem(text=t) for t in texts])
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_bad_input_is_a_typed_4xx_and_server_survives(server: ServerProcess) -> None:
    with RewardClient(server.url) as rk:
        with pytest.raises(BadRequestError) as ei:
            rk.score(items=[{"messages": [{"role": "user", "content": "no response to score"}]}])
        assert ei.value.status == 422 and ei.value.field and ei.value.field.startswith("items[0]")
        r = httpx.post(server.url + "/v1/rewards", content=b"\x80\x81 not utf8", headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["error"]["type"] == "invalid_request"
        assert r.json()["error"]["field"] == "body"
        assert len(rk.score(texts=["still serving"])) == 1


def test_trainer_adapters(server: ServerProcess) -> None:
    with RewardClient(server.url) as rk:
        trl = make_trl_reward_func(rk)
        plain = trl(prompts=["2+2?", "2+2?"], completions=["4", "5"])
        conv = trl(prompts=[[{"role": "user", "content": "2+2?"}]] * 2,
                   completions=[[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]])
        assert plain == pytest.approx(conv, rel=1e-5)  # same chat-formatted text either way
        orl = make_openrlhf_reward_func(rk)
        q = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"]
        assert orl(q, ["<|im_start|>user\nhi<|im_end|>\n"]) == pytest.approx(rk.score(texts=q), rel=1e-6)


def _kv_metric(url: str, name: str) -> float:
    import re

    m = re.search(rf"^rewardkit_prefix_kv_cache_{name} (\S+)", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def test_grpo_mates_in_separate_requests_reuse_the_prompt_kv(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Issue 19: single-item requests (OpenRLHF's query shape and the native API), one after another, so every
    mate lands in its own batch. The first of each group stores its prompt; the others reuse it; rewards equal the
    plain single forward; the byte gauge stays under the budget."""
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=512)
    prompts = [f"Group {g}: please explain, step by step, how a careful reviewer weighs evidence. " * 3
               for g in range(3)]
    items = [ScoreItem(prompt=p, response=f"answer {k} " * (k + 1)) for p in prompts for k in range(4)]
    texts = [fmt.render(it)[0] for it in items]
    want = [reference_score(rm, fmt.encode(ScoreItem(text=t))) for t in texts]
    with ServerProcess(tiny_llama_dir, tmp_path, "--max-length", "512", "--prefix-cache-mb", "1") as srv:
        got = [httpx.post(srv.url + "/get_reward", json={"query": [t]}).json()["rewards"][0] for t in texts]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert _kv_metric(srv.url, "hits_total") == 9  # 3 groups x 3 mates
        assert _kv_metric(srv.url, "stores_total") == 3
        assert 0 < _kv_metric(srv.url, "bytes") <= 2**20
        with RewardClient(srv.url) as rk:  # the native API, chat items: the prompt part is what is stored
            native = rk.score(prompts=[it.prompt for it in items], responses=[it.response for it in items])
        assert native == pytest.approx(want, rel=1e-4, abs=1e-5)
    with ServerProcess(tiny_llama_dir, tmp_path, "--max-length", "512", "--prefix-cache-mb", "0") as off:
        assert httpx.post(off.url + "/get_reward", json={"query": texts[:2]}).status_code == 200
        assert _kv_metric(off.url, "hits_total") == 0


def test_a_pooled_readout_model_reuses_the_prompt_kv_over_http(tmp_path: Path) -> None:
    """The default model's kind of read-out (mean of a middle layer over the response + the LM's log-likelihood)
    takes the KV cache too, once the response start is known: OpenRLHF's ``prompts`` gives it. Without ``prompts``
    the query is plain text, the pooled states cover every token, and nothing is looked up."""
    from rewardkit.core.testing import make_readout_checkpoint, make_tiny_reward_model

    base = make_tiny_reward_model(tmp_path / "tied", arch="llama", layers=3, tie_embeddings=True)
    model = make_readout_checkpoint(base, tmp_path / "pooled", layer=2, ll_weight=0.7)
    rm = load_reward_model(model)
    fmt = Formatter(rm.tokenizer, max_length=512)
    groups = [f"Group {g}: please explain, step by step, how a careful reviewer weighs evidence. " * 3
              for g in range(3)]
    rendered = [fmt.render(ScoreItem(prompt=p, response=f"answer {k} " * (k + 1))) for p in groups for k in range(4)]
    texts, prompts = [r[0] for r in rendered], [r[0][:r[1]] for r in rendered]
    want = [reference_score(rm, fmt.encode(ScoreItem(text=t, response_start=len(p)))) for t, p in zip(texts, prompts, strict=True)]
    want_plain = [reference_score(rm, fmt.encode(ScoreItem(text=t))) for t in texts[:2]]
    assert want[:2] != pytest.approx(want_plain, abs=1e-3)  # the response start changes what is pooled
    with ServerProcess(model, tmp_path, "--max-length", "512", "--prefix-cache-mb", "1") as srv:
        got = [httpx.post(srv.url + "/get_reward", json={"query": [t], "prompts": [p]}).json()["rewards"][0]
               for t, p in zip(texts, prompts, strict=True)]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert _kv_metric(srv.url, "hits_total") == 9  # 3 groups x 3 mates
        assert _kv_metric(srv.url, "stores_total") == 3
        plain = httpx.post(srv.url + "/get_reward", json={"query": texts[:2]}).json()["rewards"]
        assert plain == pytest.approx(want_plain, rel=1e-4, abs=1e-5)
        assert _kv_metric(srv.url, "hits_total") + _kv_metric(srv.url, "misses_total") == 12  # not looked up
