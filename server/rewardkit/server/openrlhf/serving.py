"""The work behind ``POST /get_reward``: one reward per query text, the response start taken from ``prompts``.
"""

from __future__ import annotations

from fastapi import Response

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.errors import BadRequest
from rewardkit.server.openrlhf.protocol import GetRewardRequest, GetRewardResponse
from rewardkit.server.service import RewardService, set_score_headers


async def get_reward(service: RewardService, req: GetRewardRequest, response: Response) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text."""
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
    scored = await service.score(items, field="query")
    set_score_headers(response, service)
    rewards = [s.score.reward for s in scored]
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs={"rm_score": rewards})
