"""Trainer adapters (TRL, OpenRLHF, verl) against the fake server."""

from __future__ import annotations

import asyncio
import inspect

import httpx
import numpy as np
import pytest

from rewardkit.client import AsyncRewardClient, DenseReward, RewardClient
from rewardkit.client.adapters import (
    dense_to_lists,
    dense_to_token_level_scores,
    make_openrlhf_reward_func,
    make_trl_async_reward_func,
    make_trl_reward_func,
    verl_batch_compute_score,
    verl_compute_score,
)

from .conftest import FakeServer, fake_reward

URL = "http://rm:8000"


def client(server: FakeServer, **kw) -> RewardClient:
    return RewardClient(URL, transport=httpx.MockTransport(server), **kw)


# ---------------------------------------------------------------- TRL
def test_trl_plain_text_one_request_per_call(server: FakeServer) -> None:
    f = make_trl_reward_func(client(server, max_items_per_request=4), name="rm_score")
    assert f.__name__ == "rm_score"
    prompts = ["What is 2+2?"] * 8  # one GRPO group of 8
    completions = [str(i) for i in range(8)]
    out = f(prompts=prompts, completions=completions, completion_ids=[[1]] * 8, answer=["4"] * 8)
    assert out == [
        fake_reward({"prompt": p, "response": c}) for p, c in zip(prompts, completions, strict=True)
    ]
    (body,) = server.bodies()  # not split, despite max_items_per_request=4
    assert body["items"][3] == {"prompt": "What is 2+2?", "response": "3"}


def test_trl_conversational(server: FakeServer) -> None:
    f = make_trl_reward_func(client(server))
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]] * 2
    completions = [
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "Yo", "x": 1}],
    ]
    out = f(prompts, completions)
    (body,) = server.bodies()
    assert body["items"] == [
        {"messages": [*prompts[0], {"role": "assistant", "content": "Hello!"}]},
        {"messages": [*prompts[1], {"role": "assistant", "content": "Yo"}]},  # trainer extras dropped
    ]
    assert out == [fake_reward(i) for i in body["items"]]


def test_trl_input_errors(server: FakeServer) -> None:
    f = make_trl_reward_func(client(server))
    with pytest.raises(ValueError, match="lengths differ"):
        f(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        f(["a"], [[{"role": "assistant", "content": "c"}]])
    with pytest.raises(ValueError, match=r"prompts\[0\]\[0\]"):
        f([[{"content": "no role"}]], ["c"])
    assert server.requests == []


def test_trl_client_kind_is_checked(server: FakeServer) -> None:
    with pytest.raises(TypeError, match="make_trl_async_reward_func"):
        make_trl_reward_func(AsyncRewardClient(URL))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="make_trl_reward_func"):
        make_trl_async_reward_func(client(server))  # type: ignore[arg-type]


def test_trl_async_plain_and_conversational(server: FakeServer) -> None:
    async def main() -> tuple[list[float], list[float]]:
        async with AsyncRewardClient(
            URL, transport=httpx.MockTransport(server), max_items_per_request=1
        ) as rk:
            f = make_trl_async_reward_func(rk, name="rk_async")
            assert f.__name__ == "rk_async" and inspect.iscoroutinefunction(f)
            plain = await f(prompts=["p", "p"], completions=["a", "bb"])
            conv = await f(
                prompts=[[{"role": "user", "content": "u"}]],
                completions=[[{"role": "assistant", "content": "v"}]],
            )
            return plain, conv

    plain, conv = asyncio.run(main())
    assert plain == [0.2, 0.3] and conv == [0.2]
    assert [len(b["items"]) for b in server.bodies()] == [2, 1]  # whole group in one request


# ---------------------------------------------------------------- OpenRLHF / verl
def test_openrlhf_sends_full_texts(server: FakeServer) -> None:
    f = make_openrlhf_reward_func(client(server, max_items_per_request=2))
    queries = ["<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>", "q2", "q3"]
    out = f(queries, ["Q", "", ""], labels=[None] * 3)
    assert out == [fake_reward({"text": q}) for q in queries]
    assert [b["items"] for b in server.bodies()] == [[{"text": queries[0]}, {"text": "q2"}], [{"text": "q3"}]]
    with pytest.raises(ValueError, match="lengths differ"):
        f(["a"], ["a", "b"])


def test_verl_compute_score_item_kinds(server: FakeServer) -> None:
    score = verl_compute_score(client(server))
    assert score("gsm8k", "The answer is 4", "4") == fake_reward({"text": "The answer is 4"})
    assert score("gsm8k", "4", "4", extra_info={"question": "2+2?"}) == fake_reward({"text": "2+2?4"})
    msgs = [{"role": "user", "content": "Hi"}]
    assert isinstance(
        score(data_source="x", solution_str="Yo", ground_truth=None, extra_info={"prompt": msgs}), float
    )
    assert [b["items"][0] for b in server.bodies()] == [
        {"text": "The answer is 4"},
        {"prompt": "2+2?", "response": "4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ]


def test_verl_batch_compute_score(server: FakeServer) -> None:
    score = verl_batch_compute_score(client(server))
    out = score(["d"] * 3, ["a", "bb", "ccc"], [None] * 3, [{"prompt": "p"}, None, {}])
    assert out == [0.2, 0.2, 0.3]
    (body,) = server.bodies()
    assert body["items"] == [{"prompt": "p", "response": "a"}, {"text": "bb"}, {"text": "ccc"}]
    with pytest.raises(ValueError, match="extra_infos: 1 entries for 2"):
        score(["d"] * 2, ["a", "b"], None, [None])


# ---------------------------------------------------------------- dense layouts
def _dense(values: list[float]) -> DenseReward:
    return DenseReward(reward=float(sum(values)), token_rewards=np.float32(values))


def test_dense_to_token_level_scores_layout() -> None:
    out = dense_to_token_level_scores(
        [_dense([1, 2, 3]), _dense([4]), np.float32([])], [3, 1, 0], max_length=5
    )
    assert out.dtype == np.float32 and out.shape == (3, 5)
    np.testing.assert_array_equal(out, np.float32([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    assert dense_to_token_level_scores([_dense([1, 2])], np.array([2])).shape == (1, 2)


def test_dense_to_token_level_scores_length_checks() -> None:
    with pytest.raises(ValueError, match=r"dense_rewards\[1\]: 2 token rewards for a response of 3 tokens"):
        dense_to_token_level_scores([_dense([1]), _dense([1, 2])], [1, 3])
    loose = dense_to_token_level_scores([_dense([1, 2, 3]), _dense([5])], [2, 3], strict=False)
    np.testing.assert_array_equal(loose, np.float32([[1, 2, 0], [5, 0, 0]]))
    with pytest.raises(ValueError, match="max_length=2"):
        dense_to_token_level_scores([_dense([1, 2, 3])], [3], max_length=2)
    with pytest.raises(ValueError, match="response_lengths: 1 entries for 2"):
        dense_to_token_level_scores([_dense([1]), _dense([1])], [1])


def test_dense_to_lists() -> None:
    out = dense_to_lists([_dense([0.5, -1.0]), [2.0]])
    assert out == [[0.5, -1.0], [2.0]] and all(type(x) is float for x in out[0])


def test_dense_end_to_end_with_policy_spans(server: FakeServer) -> None:
    rk = client(server)
    dense = rk.score_dense(
        prompts=["p", "p"], responses=["abcd", "xy"], response_token_spans=[[[0, 1], [1, 4]], [[0, 2]]]
    )
    scores = dense_to_token_level_scores(dense, [2, 1])
    np.testing.assert_array_equal(scores, np.float32([[0.25, 0.75], [0.5, 0.0]]))
