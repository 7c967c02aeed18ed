"""``POST /get_reward`` (thin).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.deps import get_registry, require_api_key
from rewardkit.server.openrlhf import serving
from rewardkit.server.openrlhf.protocol import GetRewardRequest, GetRewardResponse
from rewardkit.server.protocol import ERRORS

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


Registry = Annotated[ModelRegistry, Depends(get_registry)]


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(req: GetRewardRequest, registry: Registry, response: Response) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text."""
    return await serving.get_reward(registry, req, response)
