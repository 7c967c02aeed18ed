"""Reward functions for RL trainers, backed by a rewardkit server.

* TRL ``GRPOTrainer``: :func:`make_trl_reward_func` / :func:`make_trl_async_reward_func`.
* OpenRLHF (``--remote_rm_url`` custom function): :func:`make_openrlhf_reward_func`.
* verl (``custom_reward_function``): :func:`verl_compute_score`, :func:`verl_batch_compute_score`, and
  :func:`dense_to_token_level_scores` for verl's ``token_level_scores`` layout.

Example (TRL)::

    from trl import GRPOTrainer
    from rewardkit.client import RewardClient
    from rewardkit.client.adapters import make_trl_reward_func

    rk = RewardClient("http://rm:8000")
    trainer = GRPOTrainer(model=..., reward_funcs=[make_trl_reward_func(rk)], ...)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from rewardkit.client._base import Item
from rewardkit.client._client import AsyncRewardClient, RewardClient
from rewardkit.client.types import DenseReward

__all__ = [
    "dense_to_lists",
    "dense_to_token_level_scores",
    "make_openrlhf_reward_func",
    "make_trl_async_reward_func",
    "make_trl_reward_func",
    "verl_batch_compute_score",
    "verl_compute_score",
]

_PROMPT_KEYS = ("prompt", "question")


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"{where}: expected a {{role, content}} message dict, got {m!r}")
    return {"role": m["role"], "content": m["content"]}  # drop trainer-side extras


def _trl_items(prompts: Sequence[Any], completions: Sequence[Any]) -> list[Item]:
    """TRL's (prompts, completions) -> API items, for standard and conversational datasets."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts/completions: lengths differ ({len(prompts)} vs {len(completions)})")
    items: list[Item] = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if isinstance(p, str):
            if not isinstance(c, str):
                raise TypeError(
                    f"completions[{i}]: a plain-text prompt needs a str completion, got {type(c).__name__}"
                )
            items.append({"prompt": p, "response": c})
            continue
        msgs = [_message(m, f"prompts[{i}][{j}]") for j, m in enumerate(p)]
        if isinstance(c, str):  # conversational prompt, raw completion text
            msgs.append({"role": "assistant", "content": c})
        else:
            msgs.extend(_message(m, f"completions[{i}][{j}]") for j, m in enumerate(c))
        items.append({"messages": msgs})
    return items


def _named(fn: Any, name: str) -> Any:
    fn.__name__ = name
    fn.__qualname__ = name
    return fn


def make_trl_reward_func(
    client: RewardClient, name: str = "rewardkit", model: str | None = None
) -> Callable[..., list[float]]:
    """A TRL ``GRPOTrainer`` reward function ``f(prompts, completions, **kwargs) -> list[float]``.

    Plain-text datasets give ``{prompt, response}`` items; conversational ones (prompts are message
    lists, completions ``[{"role": "assistant", ...}]``) give ``{messages: prompt + completion}``.
    Each call sends the whole batch in one request, so the server sees a GRPO group's shared prompt
    together. TRL logs the reward under ``f.__name__`` (= ``name``).

    Example::

        >>> f = make_trl_reward_func(rk, name="rm")
        >>> f(prompts=["2+2?"] * 2, completions=["4", "5"])
        [1.9, -0.7]
    """
    if not isinstance(client, RewardClient):
        raise TypeError(
            f"client: expected RewardClient, got {type(client).__name__} (use make_trl_async_reward_func)"
        )

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return client._score_items(_trl_items(prompts, completions), model=model, split=False)

    return _named(reward_func, name)


def make_trl_async_reward_func(
    client: AsyncRewardClient, name: str = "rewardkit", model: str | None = None
) -> Callable[..., Awaitable[list[float]]]:
    """Like :func:`make_trl_reward_func`, as ``async def f(prompts, completions, **kwargs)``.

    For TRL versions that await coroutine reward functions (several reward functions then run
    concurrently). Example::

        >>> f = make_trl_async_reward_func(AsyncRewardClient("http://rm:8000"))
        >>> await f(prompts=["2+2?"], completions=["4"])
        [1.9]
    """
    if not isinstance(client, AsyncRewardClient):
        raise TypeError(
            f"client: expected AsyncRewardClient, got {type(client).__name__} (use make_trl_reward_func)"
        )

    async def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return await client._score_items(_trl_items(prompts, completions), model=model, split=False)

    return _named(reward_func, name)


def make_openrlhf_reward_func(client: RewardClient, model: str | None = None) -> Callable[..., list[float]]:
    """An OpenRLHF-style ``f(queries, prompts, labels=None) -> list[float]``.

    ``queries`` are the full formatted texts (prompt + response, chat template applied), as OpenRLHF
    sends them; they are scored as ``{text}`` items. ``prompts`` and ``labels`` are accepted for
    signature compatibility and not sent.

    Example::

        >>> f = make_openrlhf_reward_func(rk)
        >>> f(["<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>"], ["2+2?"])
        [1.9]
    """

    def reward_func(
        queries: Sequence[str], prompts: Sequence[str] | None = None, labels: Any = None, **kwargs: Any
    ) -> list[float]:
        if prompts is not None and len(prompts) != len(queries):
            raise ValueError(f"queries/prompts: lengths differ ({len(queries)} vs {len(prompts)})")
        return client.score(texts=list(queries), model=model)

    return _named(reward_func, "rewardkit_openrlhf")


def _verl_item(solution_str: str, extra_info: Mapping[str, Any] | None) -> Item:
    for key in _PROMPT_KEYS:
        prompt = (extra_info or {}).get(key)
        if isinstance(prompt, str):
            return {"prompt": prompt, "response": solution_str}
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            msgs = [_message(m, f"extra_info[{key!r}]") for m in prompt]
            return {"messages": [*msgs, {"role": "assistant", "content": solution_str}]}
    return {"text": solution_str}


def verl_compute_score(client: RewardClient, model: str | None = None) -> Callable[..., float]:
    """A verl ``compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float``.

    When ``extra_info`` has a ``"prompt"`` (or ``"question"``), as a string or a message list, the
    item is ``{prompt, response}`` / ``{messages}``; otherwise ``solution_str`` is scored as a full
    ``{text}``. ``ground_truth`` is ignored (a reward model needs none). One request per call: prefer
    :func:`verl_batch_compute_score` with verl's batch reward manager.
    """

    def compute_score(
        data_source: Any,
        solution_str: str,
        ground_truth: Any = None,
        extra_info: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> float:
        return client._score_items([_verl_item(solution_str, extra_info)], model=model)[0]

    return _named(compute_score, "compute_score")


def verl_batch_compute_score(client: RewardClient, model: str | None = None) -> Callable[..., list[float]]:
    """verl's batched form: ``compute_score(data_sources, solution_strs, ground_truths, extra_infos)``.

    Items are built as in :func:`verl_compute_score`; long batches are split per
    ``max_items_per_request``.
    """

    def compute_score(
        data_sources: Sequence[Any],
        solution_strs: Sequence[str],
        ground_truths: Sequence[Any] | None = None,
        extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        infos = list(extra_infos) if extra_infos is not None else [None] * len(solution_strs)
        if len(infos) != len(solution_strs):
            raise ValueError(f"extra_infos: {len(infos)} entries for {len(solution_strs)} solution_strs")
        items = [_verl_item(s, e) for s, e in zip(solution_strs, infos, strict=True)]
        return client._score_items(items, model=model)

    return _named(compute_score, "compute_score")


def _vector(d: DenseReward | np.ndarray | Sequence[float]) -> np.ndarray:
    vec = d.token_rewards if isinstance(d, DenseReward) else d
    return np.asarray(vec, dtype=np.float32).reshape(-1)


def dense_to_token_level_scores(
    dense_rewards: Sequence[DenseReward | np.ndarray | Sequence[float]],
    response_lengths: Sequence[int] | np.ndarray,
    max_length: int | None = None,
    strict: bool = True,
) -> np.ndarray:
    """Lay dense rewards out as verl's ``token_level_scores``: ``(B, L)`` float32, right-padded with 0.

    Args:
        dense_rewards: per sample a :class:`DenseReward` (or a 1-D array) over the *policy's* response
            tokens; get those by passing ``response_token_spans`` to ``score_dense``.
        response_lengths: the number of valid response tokens per sample (verl: ``response_mask.sum(-1)``).
        max_length: ``L``, the padded response width; default ``max(response_lengths)``.
        strict: raise when a vector's length differs from its response length; when False, longer
            vectors are cut and shorter ones zero-padded.

    Example::

        >>> dense_to_token_level_scores([np.float32([1, 2]), np.float32([3])], [2, 1], max_length=3)
        array([[1., 2., 0.],
               [3., 0., 0.]], dtype=float32)
    """
    lengths = [int(n) for n in np.asarray(response_lengths).reshape(-1)]
    if len(lengths) != len(dense_rewards):
        raise ValueError(f"response_lengths: {len(lengths)} entries for {len(dense_rewards)} dense rewards")
    width = max(lengths, default=0) if max_length is None else int(max_length)
    if any(n < 0 or n > width for n in lengths):
        raise ValueError(
            f"response_lengths: every length must be within [0, max_length={width}], got {lengths}"
        )
    out = np.zeros((len(lengths), width), dtype=np.float32)  # (B, L)
    for i, (d, n) in enumerate(zip(dense_rewards, lengths, strict=True)):
        vec = _vector(d)
        if vec.shape[0] != n and strict:
            raise ValueError(
                f"dense_rewards[{i}]: {vec.shape[0]} token rewards for a response of {n} tokens; pass "
                "response_token_spans to score_dense so the server projects onto the policy's tokens, "
                "or use strict=False"
            )
        k = min(n, vec.shape[0])
        out[i, :k] = vec[:k]
    return out


def dense_to_lists(dense_rewards: Sequence[DenseReward | np.ndarray | Sequence[float]]) -> list[list[float]]:
    """Dense rewards as plain Python lists (for JSON logs or OpenRLHF ``extra_logs``)."""
    return [[float(x) for x in _vector(d)] for d in dense_rewards]
