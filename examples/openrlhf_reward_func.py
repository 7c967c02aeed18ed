"""OpenRLHF custom reward function backed by a rewardkit server.

OpenRLHF loads a Python file given as the remote reward URL and calls its ``reward_func`` once per batch::

    # OpenRLHF >= Aug 2026                      # older releases
    --reward.remote_url examples/openrlhf_reward_func.py   # --remote_rm_url examples/openrlhf_reward_func.py

Set ``REWARDKIT_URL`` (comma-separated for failover) and ``REWARDKIT_API_KEY`` if the server has keys. ``queries`` are
the full texts the policy produced (prompt + response, chat template applied, special tokens kept), so they are
scored as ``{text}`` items, exactly as ``/get_reward`` scores them. The return is the dict OpenRLHF reads: ``rewards`` (used for the advantage), ``scores`` (logged), ``extra_logs``.

To use rewardkit as a plain remote RM instead (no file), give the server's ``/get_reward`` URL:
``--reward.remote_url http://rm:8000/get_reward``.
"""

from __future__ import annotations

from typing import Any

import torch

from rewardkit.client import RewardClient

_CLIENT: RewardClient | None = None


def _client() -> RewardClient:
    global _CLIENT  # one pooled client per worker process
    if _CLIENT is None:
        _CLIENT = RewardClient()
    return _CLIENT


def reward_func(queries: list[str], prompts: list[str], labels: list[Any] | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """OpenRLHF's signature: ``reward_func(queries, prompts, labels)``; an empty shard returns empty tensors."""
    if not queries:
        empty = torch.zeros(0)
        return {"rewards": empty, "scores": empty, "extra_logs": {}}
    rk = _client()
    scores = rk.score(texts=list(queries))
    rewards = torch.tensor(list(scores), dtype=torch.float32)
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": {"rm_score": rewards.clone()}}
