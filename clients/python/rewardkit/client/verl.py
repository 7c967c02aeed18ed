"""verl custom reward function backed by a rewardkit server.

verl's reward-model path only talks to servers verl starts itself; an outside reward service is reached through
``reward.custom_reward_function``. Point it at this file::

    # find the file: python -c "import rewardkit.client.verl as v; print(v.__file__)"
    reward.custom_reward_function.path=/path/to/site-packages/rewardkit/client/verl.py
    reward.custom_reward_function.name=compute_score

and set ``REWARDKIT_URL`` (one URL or a comma-separated list, for failover) and, when the server has keys,
``REWARDKIT_API_KEY`` in the workers' environment (``ray_kwargs.ray_init.runtime_env.env_vars``).

verl's reward manager awaits ``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)``
once per sample (plus ``reward_router_address`` / ``reward_model_tokenizer`` when it runs its own RM servers, which
are ignored here). The prompt comes from ``extra_info["prompt"]`` or ``extra_info["question"]`` (a string or a message
list); without one, ``solution_str`` is scored as a whole text. The result is ``{"score": reward, "rm_model": ...,
"rm_head_version": ...}``: verl keeps the extra keys per sample and skips strings in its metrics, so the head version
that scored each sample lands in the logged generations.

Calls are batched: one shared :class:`~rewardkit.client.AsyncRewardClient` per event loop, and calls that arrive
within ``REWARDKIT_VERL_BATCH_MS`` (default 5 ms) of the first go out as one request of up to
``REWARDKIT_VERL_MAX_BATCH`` items (default 64). If a batched request is refused as bad input (4xx), its items are
retried one by one, so one bad sample fails only its own call. verl never retries a 4xx and retries a 5xx with
backoff; the client already retries 429/503 within its own bounded budget.

This module imports only the rewardkit client (httpx, pydantic, numpy): verl may load it as a plain file.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from rewardkit.client._client import AsyncRewardClient
from rewardkit.client.errors import BadRequestError, PayloadTooLargeError

__all__ = ["RewardBatcher", "compute_score", "verl_item"]

BATCH_MS_ENV = "REWARDKIT_VERL_BATCH_MS"
MAX_BATCH_ENV = "REWARDKIT_VERL_MAX_BATCH"
_PROMPT_KEYS = ("prompt", "question")


def verl_item(solution_str: str, extra_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The API item for one verl sample: ``{prompt, response}``, ``{messages}`` or ``{text}``.

    Example::

        >>> verl_item("4", {"prompt": "2+2?"})
        {'prompt': '2+2?', 'response': '4'}
    """
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str: expected str, got {type(solution_str).__name__}")
    info = extra_info if isinstance(extra_info, Mapping) else {}
    for key in _PROMPT_KEYS:
        prompt = info.get(key)
        if isinstance(prompt, str) and prompt:
            return {"prompt": prompt, "response": solution_str}
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt:
            msgs = []
            for j, m in enumerate(prompt):
                if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                    raise ValueError(f"extra_info[{key!r}][{j}]: expected a {{role, content}} message, got {m!r}")
                msgs.append({"role": str(m["role"]), "content": str(m["content"])})
            return {"messages": [*msgs, {"role": "assistant", "content": solution_str}]}
    return {"text": solution_str}


class _Pending:
    __slots__ = ("future", "item")

    def __init__(self, item: dict[str, Any], future: asyncio.Future[dict[str, Any]]) -> None:
        self.item = item
        self.future = future


class RewardBatcher:
    """Gathers concurrent single-sample calls on one event loop into few requests.

    Example::

        batcher = RewardBatcher(AsyncRewardClient("http://rm:8000"), window_s=0.005)
        result = await batcher.submit({"prompt": "2+2?", "response": "4"})   # {"score": ..., ...}
    """

    # Plain class, no dataclass: verl may exec this file as a module that is not in sys.modules, where dataclasses
    # cannot resolve postponed annotations.
    def __init__(self, client: AsyncRewardClient, window_s: float = 0.005, max_items: int = 64) -> None:
        self.client = client
        self.window_s = window_s
        self.max_items = max_items
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        p = _Pending(item, loop.create_future())
        self._pending.append(p)
        if len(self._pending) >= self.max_items:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await p.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)  # keep a reference until done
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            scores = await self.client._score_items([p.item for p in batch], split=True)
        except (BadRequestError, PayloadTooLargeError, ValueError, TypeError) as exc:
            # refused as bad input, by the server (4xx) or while encoding the body here (text that is not valid
            # Unicode): isolate the bad sample, each alone, so only its own call fails
            if len(batch) > 1:
                await asyncio.gather(*(self._send([p]) for p in batch))
                return
            _fail(batch, exc)
            return
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it, then the task ends
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for p, reward, version in zip(batch, scores, scores.head_versions, strict=True):
            if not p.future.done():
                p.future.set_result({"score": float(reward), "rm_model": scores.model or "",
                                     "rm_head_version": version or ""})


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RewardBatcher] = weakref.WeakKeyDictionary()


def _batcher() -> RewardBatcher:
    """The process's batcher (and its client) for the running event loop, created on first use."""
    loop = asyncio.get_running_loop()
    b = _BATCHERS.get(loop)
    if b is None:
        window_ms = float(os.environ.get(BATCH_MS_ENV, "5"))
        max_items = int(os.environ.get(MAX_BATCH_ENV, "64"))
        if window_ms < 0 or max_items < 1:
            raise ValueError(f"{BATCH_MS_ENV} must be >= 0 and {MAX_BATCH_ENV} >= 1, got {window_ms}, {max_items}")
        b = RewardBatcher(AsyncRewardClient(), window_s=window_ms / 1000.0, max_items=max_items)
        _BATCHERS[loop] = b
    return b


async def compute_score(data_source: Any, solution_str: str, ground_truth: Any = None,
                        extra_info: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """verl's ``compute_score``: the reward of one sample from the rewardkit server at ``REWARDKIT_URL``.

    ``data_source`` and ``ground_truth`` are not sent (a reward model needs neither); keyword arguments verl adds
    (``reward_router_address``, ``reward_model_tokenizer``, ...) are accepted and ignored.

    Example::

        >>> await compute_score("gsm8k", "The answer is 4.", "4", {"prompt": "What is 2+2?"})
        {'score': 1.93, 'rm_model': 'smollm2-135m-instruct-rewardkit-bt', 'rm_head_version': '...'}
    """
    return await _batcher().submit(verl_item(solution_str, extra_info))
