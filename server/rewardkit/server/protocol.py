"""Request and response models of the native API (``/v1/...``). Size limits that are settings are checked in
``serving.py``; the schema carries the structural rules."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The server's max_items_per_request for the request being parsed (set by the app's middleware). The list validators
# below check a list's length *before* pydantic validates its elements: 300k tiny items used to stall the event loop
# for seconds of per-item validation before the 413.
MAX_ITEMS: ContextVar[int | None] = ContextVar("rewardkit_max_items", default=None)


def check_count(v: Any, field: str) -> Any:
    """Refuse a list longer than ``max_items_per_request`` with 413, before its items are validated."""
    limit = MAX_ITEMS.get()
    if limit is not None and isinstance(v, list) and len(v) > limit:
        from rewardkit.server.errors import PayloadTooLarge

        raise PayloadTooLarge(f"{field}: {len(v)} items exceeds max_items_per_request={limit}", field=field)
    return v


class ErrorInfo(BaseModel):
    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class RewardItem(BaseModel):
    """One item: ``prompt`` + ``response``, or ``messages`` (last one = assistant response), or pre-formatted ``text``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    response: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: str | None = None
    response_token_spans: list[tuple[int, int]] | None = Field(
        None, description="character spans of the caller's policy tokens in the response (dense projection)")

    @model_validator(mode="after")
    def _one_kind(self) -> RewardItem:
        kinds = [self.prompt is not None or self.response is not None, self.messages is not None, self.text is not None]
        if sum(kinds) != 1:
            raise ValueError("give exactly one of: prompt+response, messages, text")
        if kinds[0] and (self.prompt is None or self.response is None):
            raise ValueError("prompt and response must both be given")
        if self.text is not None and self.text == "":
            raise ValueError("text must not be empty")
        return self


class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    items: list[RewardItem] = Field(..., min_length=1)
    dense: bool = False

    @field_validator("items", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return check_count(v, "items")
    beta: float = Field(0.8, ge=0.0, le=1.0, description="ABC: share of the reward spread by attention")
    encoding_format: Literal["base64", "float"] = "base64"
    truncate: bool | None = Field(None, description="override the server's truncation setting for this request")


class DenseReward(BaseModel):
    token_rewards: str | list[float]
    dtype: Literal["float32"] = "float32"
    tokens: list[str] | None = None
    spans: list[tuple[int, int]]
    beta: float


class ItemResult(BaseModel):
    index: int
    reward: float
    num_tokens: int
    truncated: bool
    dense: DenseReward | None = None


class Usage(BaseModel):
    total_tokens: int


class RewardResponse(BaseModel):
    model: str
    head_version: str
    rewards: list[float]
    results: list[ItemResult]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    head_version: str
    trained: bool
    description: str
    max_length: int
    dtype: str
    device: str
    reward_token_rule: str
    norm_mean: float
    norm_std: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Status(BaseModel):
    status: str
