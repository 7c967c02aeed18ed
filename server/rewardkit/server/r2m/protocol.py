"""Response models of ``/v1/r2m/*`` (requests are binary RKF1 streams, see rewardkit.core.wire)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class R2MRewardResult(BaseModel):
    """One scored frame."""

    frame: int = Field(description="0-based frame index in the request stream")
    group_id: str
    index: int
    reward: float = Field(description="R2M reward, normalised like /v1/rewards")
    rm_reward: float = Field(description="the frozen RM's reward for the same item")
    w: float = Field(description="mix weight w(t) used for this frame's round")
    item_key: str = Field(description="reference to this item's RM hidden state (usable as rm_item_key in feedback)")


class R2MRewardResponse(BaseModel):
    model: str
    head_version: str = Field(description="the R2M head version every reward in this response came from")
    rewards: list[float]
    results: list[R2MRewardResult]


class FeedbackResponse(BaseModel):
    """What a feedback stream did. Groups are applied by the background updater, not within this request."""

    accepted_frames: int
    bytes: int
    queue: str = Field(description="'redis' or 'memory'")
    head_version: str = Field(description="current head version when the response was written")
    flushed: bool = False
    applied_groups: list[str] = Field(default_factory=list, description="groups applied by this request's flush")


class HeadInfo(BaseModel):
    version: str
    round: int
    created_at: float
    groups: int = Field(description="groups applied by the update that produced this version")
    parent: str | None = None
    loss: float | None = None
    active: bool = False


class HeadList(BaseModel):
    model: str
    active: str
    heads: list[HeadInfo]


class R2MStatus(BaseModel):
    model: str
    active: str
    queue: str
    updater_running: bool
    pending_groups: int
    pending_frames: int
    updates_applied: int
    groups_applied: int
    groups_rejected: int
    last_error: str | None = None
