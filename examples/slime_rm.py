"""slime custom reward model backed by a rewardkit server.

slime imports a function path given on its command line and awaits it per sample, or per group with
``--group-rm``::

    --custom-rm-path examples.slime_rm.custom_rm              # async def custom_rm(args, sample) -> float
    --custom-rm-path examples.slime_rm.batched_custom_rm --group-rm
                                                              # async def batched_custom_rm(args, samples) -> list

Set ``REWARDKIT_URL`` (comma-separated for failover) and ``REWARDKIT_API_KEY`` if the server has keys. A ``Sample``'s
``prompt`` is a string or a message list and ``response`` the generated text; ``label`` and ``metadata`` are not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rewardkit.client import AsyncRewardClient
from rewardkit.client.verl import verl_item

_CLIENTS: dict[int, AsyncRewardClient] = {}


def _client() -> AsyncRewardClient:
    loop_id = id(asyncio.get_running_loop())  # an async client belongs to one event loop
    if loop_id not in _CLIENTS:
        _CLIENTS[loop_id] = AsyncRewardClient()
    return _CLIENTS[loop_id]


def _item(sample: Any) -> dict[str, Any]:
    prompt = getattr(sample, "prompt", None)
    return verl_item(str(getattr(sample, "response", "")), {"prompt": prompt} if prompt else None)


async def custom_rm(args: Any, sample: Any) -> float:
    """One sample's reward."""
    return float((await _client().score(items=[_item(sample)]))[0])


async def batched_custom_rm(args: Any, samples: Sequence[Any]) -> list[float]:
    """A group's rewards in one request (``--group-rm``)."""
    if not samples:
        return []
    return [float(r) for r in await _client().score(items=[_item(s) for s in samples])]
