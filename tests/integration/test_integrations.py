"""Each trainer integration with that trainer's exact payload and call signature, against a real server process."""

from __future__ import annotations

import asyncio
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from rewardkit.client import PayloadTooLargeError, RewardClient
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("srv"), "--max-length", "128",
                       "--served-model-name", "Org/tiny-rm") as srv:
        yield srv


@pytest.fixture(scope="module")
def ref(tiny_llama_dir: Path) -> Any:
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=128)
    return lambda item: reference_score(rm, fmt.encode(item))


def _requests(url: str, endpoint: str) -> float:
    text = httpx.get(url + "/metrics").text
    pattern = r'rewardkit_requests_total\{endpoint="' + re.escape(endpoint) + r'",status="200"\} ([0-9.e+]+)'
    m = re.search(pattern, text)
    return float(m.group(1)) if m else 0.0


def _load(path: Path) -> ModuleType:
    """Load a file the way verl / OpenRLHF load a custom reward file: by path, as a standalone module."""
    spec = importlib.util.spec_from_file_location(f"custom_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- verl ----------------------------------------------------------------------------------------------------------
def test_verl_compute_score_with_verls_exact_kwargs(server: ServerProcess, ref: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import rewardkit.client.verl as verl_mod

    monkeypatch.setenv("REWARDKIT_URL", server.url)
    monkeypatch.setenv("REWARDKIT_VERL_BATCH_MS", "20")
    mod = _load(Path(verl_mod.__file__))  # reward.custom_reward_function.path = that file
    compute_score = mod.compute_score
    version = RewardClient(server.url).models()[0].head_version
    prompts = [f"What is {i} + {i}?" for i in range(24)]
    sols = [f"It is {2 * i}." for i in range(24)]

    async def run() -> list[Any]:
        calls = []
        for i, (p, s) in enumerate(zip(prompts, sols, strict=True)):
            # what verl's reward loop passes: the dataset row's extra_info plus num_turns and rollout_reward_scores,
            # and its router address / RM tokenizer (None when verl runs no RM servers of its own)
            extra = {"index": i, "prompt": p if i % 2 else [{"role": "user", "content": p}],
                     "num_turns": 2, "rollout_reward_scores": {}}
            calls.append(compute_score(data_source="openai/gsm8k", solution_str=s, ground_truth=str(2 * i),
                                       extra_info=extra, reward_router_address=None, reward_model_tokenizer=None))
        return await asyncio.gather(*calls)

    before = _requests(server.url, "/v1/rewards")
    out = asyncio.run(run())
    sent = _requests(server.url, "/v1/rewards") - before
    assert all(set(o) == {"score", "rm_model", "rm_head_version"} for o in out)
    assert [o["rm_head_version"] for o in out] == [version] * 24
    for i, o in enumerate(out):
        item = ScoreItem(prompt=prompts[i], response=sols[i]) if i % 2 else ScoreItem(
            messages=[{"role": "user", "content": prompts[i]}, {"role": "assistant", "content": sols[i]}])
        assert o["score"] == pytest.approx(ref(item), rel=1e-4, abs=1e-5)
    assert 1 <= sent <= 3, f"24 concurrent calls should go out in a few batched requests, not {sent}"


def test_verl_one_bad_sample_fails_only_its_own_call(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    from rewardkit.client import verl

    monkeypatch.setenv("REWARDKIT_URL", server.url)

    sols = ("fine", "x" * 400_001, "also fine", "bad \ud800 text")  # over max_chars_per_item; not valid Unicode

    async def run() -> list[Any]:
        calls = [verl.compute_score("ds", s, None, {"prompt": "q"}) for s in sols]
        return await asyncio.gather(*calls, return_exceptions=True)

    good1, too_long, good2, bad_text = asyncio.run(run())
    assert isinstance(good1, dict) and isinstance(good2, dict)
    assert isinstance(too_long, PayloadTooLargeError) and too_long.status == 413  # verl does not retry a 4xx
    assert isinstance(bad_text, UnicodeEncodeError)


def test_verl_text_without_prompt_is_scored_whole(server: ServerProcess, ref: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from rewardkit.client import verl

    monkeypatch.setenv("REWARDKIT_URL", server.url)
    out = asyncio.run(verl.compute_score("ds", "a full text", None, None))
    assert out["score"] == pytest.approx(ref(ScoreItem(text="a full text")), rel=1e-4, abs=1e-5)


def test_verl_reward_loop_classify_payloads(server: ServerProcess, ref: Any) -> None:
    """verl's reward loop posts /classify with its configured model path; Jan 2026 sends `activation`, later
    releases `use_activation`. It reads data[-1].probs[-1]: the raw score."""
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    want = ref(ScoreItem(text=text))
    for flag in ("activation", "use_activation"):
        r = httpx.post(server.url + "/classify", json={"model": "Org/tiny-rm", "input": text, flag: False})
        assert r.status_code == 200, r.text
        assert r.json()["data"][-1]["probs"][-1] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_sglang_embeddings_path(server: ServerProcess, ref: Any) -> None:
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "Org/tiny-rm", "input": ["x", "the reply"]})
    assert r.status_code == 200, r.text
    assert r.json()["data"][-1]["embedding"][-1] == pytest.approx(ref(ScoreItem(text="the reply")), rel=1e-4,
                                                                  abs=1e-5)
    assert r.headers["x-rewardkit-head-version"]


# --- OpenRLHF ------------------------------------------------------------------------------------------------------
def test_openrlhf_remote_url_and_reward_func_file(server: ServerProcess, ref: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    q = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    p = "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    # --reward.remote_url http://host/get_reward: OpenRLHF posts {"query", "prompts", "labels"}
    r = httpx.post(server.url + "/get_reward", json={"query": [q], "prompts": [p], "labels": ["4"]})
    assert r.status_code == 200
    assert r.json()["rewards"][0] == pytest.approx(ref(ScoreItem(text=q, response_start=len(p))), rel=1e-4, abs=1e-5)
    empty = httpx.post(server.url + "/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert empty.status_code == 200 and empty.json() == {"rewards": [], "scores": [], "extra_logs": {"rm_score": []}}
    # --reward.remote_url examples/openrlhf_reward_func.py: OpenRLHF calls reward_func(queries, prompts, labels)
    monkeypatch.setenv("REWARDKIT_URL", server.url)
    mod = _load(ROOT / "examples" / "openrlhf_reward_func.py")
    out = mod.reward_func([q, q + " "], [p, p], ["4", "4"])
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].shape == (2,)
    assert float(out["rewards"][0]) == pytest.approx(ref(ScoreItem(text=q)), rel=1e-4, abs=1e-5)
    assert mod.reward_func([], [], [])["rewards"].shape == (0,)


# --- slime ---------------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """The fields of slime's ``Sample`` a custom RM reads (slime.utils.types.Sample)."""

    prompt: str | list[dict[str, str]] = ""
    response: str = ""
    label: str | None = None
    reward: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def test_slime_custom_rm(server: ServerProcess, ref: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDKIT_URL", server.url)
    mod = _load(ROOT / "examples" / "slime_rm.py")
    args = object()  # slime passes its argparse namespace; the example reads nothing from it
    s1 = Sample(prompt="What is 3+4?", response="7", label="7")
    s2 = Sample(prompt=[{"role": "user", "content": "Hi"}], response="Hello!")

    async def run() -> tuple[float, list[float]]:
        return await mod.custom_rm(args, s1), await mod.batched_custom_rm(args, [s1, s2])

    one, group = asyncio.run(run())
    want1 = ref(ScoreItem(prompt="What is 3+4?", response="7"))
    want2 = ref(ScoreItem(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]))
    assert one == pytest.approx(want1, rel=1e-4, abs=1e-5)
    assert group == pytest.approx([want1, want2], rel=1e-4, abs=1e-5)


# --- the client ----------------------------------------------------------------------------------------------------
def test_client_scores_carry_model_and_head_version(server: ServerProcess) -> None:
    with RewardClient(server.url, max_items_per_request=2) as rk:
        info = rk.models()[0]
        s = rk.score(texts=["a", "b", "c"])
    assert isinstance(s, list) and len(s) == 3
    assert s.model == info.id and s.head_version == info.head_version
    assert s.head_versions == [info.head_version] * 3
