"""OpenRLHF's remote reward-model protocol (``openrlhf/cli/serve_rm.py``): ``POST /get_reward``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from rewardkit.server.protocol import count_validator


class GetRewardRequest(BaseModel):
    query: list[str] = Field(..., description="full prompt+response texts, formatted by the policy (may be empty)")
    prompts: list[str] | None = Field(None, description="the prompt part of each query (marks where the response starts)")
    labels: list[Any] | None = None

    _count = count_validator("query", "prompts", "labels")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]
