"""The work behind ``POST /get_reward``: one reward per query text, the response start taken from ``prompts``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Response

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.errors import BadRequest
from rewardkit.server.openrlhf.protocol import GetRewardRequest, GetRewardResponse
from rewardkit.server.service import set_score_headers


def as_reference(label: Any) -> str | None:
    """An OpenRLHF label as a match component's reference: strings and numbers; anything else is no reference."""
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        return None
    return str(label)


async def get_reward(registry: ModelRegistry, req: GetRewardRequest, response: Response) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text. With the server's ``default_rewards``
    the reward is that composition (``labels`` are the match components' references) and ``extra_logs`` carries
    each part."""
    service = registry.primary
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise BadRequest(f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", field="prompts")
    if not req.query:  # an empty shard from OpenRLHF's multi-URL split: nothing to score
        set_score_headers(response, service)
        return GetRewardResponse(rewards=[], scores=[], extra_logs={"rm_score": []})
    items: list[ScoreItem] = []
    for i, q in enumerate(req.query):
        if not q:
            raise BadRequest(f"query[{i}] must not be empty", field=f"query[{i}]")
        start = None
        if req.prompts is not None and q.startswith(req.prompts[i]):
            start = len(req.prompts[i])
        items.append(ScoreItem(text=q, response_start=start))
    refs = [as_reference(lab) for lab in req.labels] if req.labels is not None else None
    done = await registry.compat_rewards(None, items, refs, None, "query")
    registry.set_headers(response, done)
    return GetRewardResponse(rewards=done.rewards, scores=done.rewards,
                             extra_logs={"rm_score": done.rewards, **done.components})
