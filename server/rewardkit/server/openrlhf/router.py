"""``POST /get_reward`` (thin).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from rewardkit.server.deps import get_service, require_api_key
from rewardkit.server.openrlhf import serving
from rewardkit.server.openrlhf.protocol import GetRewardRequest, GetRewardResponse
from rewardkit.server.protocol import ERRORS
from rewardkit.server.service import RewardService

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


Service = Annotated[RewardService, Depends(get_service)]


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(req: GetRewardRequest, service: Service, response: Response) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text."""
    return await serving.get_reward(service, req, response)
