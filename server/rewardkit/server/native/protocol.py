"""Request and response models of the native API (``/v1/rewards``, ``/v1/models``). Size limits that are settings are
checked in ``rewardkit.server.service``; the schema carries the structural rules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewardkit.server.protocol import ChatMessage, Usage, count_validator
from rewardkit.server.runs import MAX_STEP, RUN_ID_RE


class RewardItem(BaseModel):
    """One item: ``prompt`` + ``response``, or ``messages`` (last one = assistant response), or pre-formatted ``text``."""

    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    response: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    text: str | None = None
    response_token_spans: list[tuple[int, int]] | None = Field(
        None, description="character spans of the caller's policy tokens in the response (dense projection)")
    reference: str | None = Field(None, description=(
        "the reference answer for match components (exact_match, numeric_match) in `rewards`"))

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

    _count = count_validator("items")
    beta: float = Field(0.8, ge=0.0, le=1.0, description="ABC: share of the reward spread by attention")
    encoding_format: Literal["base64", "float"] = "base64"
    truncate: bool | None = Field(None, description="override the server's truncation setting for this request")
    rewards: dict[str, float] | None = Field(None, description=(
        "a composition: name -> weight over the served models (`default` = the first) and components "
        "(GET /v1/models lists both); each item's reward is the weighted sum, its parts in `components`"))
    run_id: str | None = Field(None, pattern=RUN_ID_RE.pattern, description=(
        "the training run these rewards are for (per-run drift and metrics); wins over the x-rewardkit-run header"))
    step: int | None = Field(None, ge=0, le=MAX_STEP, description="the trainer's step (needs run_id or the header)")

    @model_validator(mode="after")
    def _composition(self) -> RewardRequest:
        if self.rewards is not None:
            if self.model is not None:
                raise ValueError("give `model` (one model) or `rewards` (a composition), not both")
            if self.dense:
                raise ValueError("dense rewards come from one model: `dense` cannot be combined with `rewards`")
        return self


class DenseReward(BaseModel):
    token_rewards: str | list[float]
    dtype: Literal["float32"] = "float32"
    tokens: list[str] | None = None
    spans: list[tuple[int, int]]
    beta: float


class ItemResult(BaseModel):
    index: int
    reward: float | None = Field(..., description="null only in a composed request where a part has an error")
    num_tokens: int
    truncated: bool
    dense: DenseReward | None = None
    components: dict[str, float | None] | None = Field(None, description="composed: each part's unweighted value")
    errors: dict[str, str] | None = Field(None, description="composed: why a part could not score this item")


class RewardResponse(BaseModel):
    model: str
    head_version: str
    rewards: list[float | None]
    weights: dict[str, float] | None = Field(None, description="composed: the weights the rewards were summed with")
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
    readout: str = Field("token", description="what the head reads: 'token' (the last layer at the reward token) or "
                         "'mean_response' (readout_layer's states averaged over the response)")
    readout_layer: int = Field(-1, description="hidden-states index the head reads (-1 = the last layer)")
    ll_weight: float = Field(0.0, description="weight of the backbone's own mean log-likelihood of the response, "
                             "added to the head's raw reward (0 = none)")
    name: str = Field("default", description="the name `model` and `rewards` may use for this model")


class ComponentCard(BaseModel):
    name: str
    kind: str
    description: str
    needs_reference: bool
    config: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    components: list[ComponentCard] = Field(default_factory=list, description="components a `rewards` composition "
                                            "may name besides the models")
    default_rewards: dict[str, float] = Field(default_factory=dict, description=(
        "what the compatibility endpoints return (empty: the first model alone)"))
