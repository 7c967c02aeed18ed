"""Drop-in endpoints for what RL trainers already speak.

- OpenRLHF remote reward model: ``POST /get_reward`` (``openrlhf/cli/serve_rm.py``'s contract).
- vLLM pooling API for reward models: ``POST /pooling`` (task ``classify`` / ``token_classify``) and
  ``POST /classify`` (``activation: false`` returns the raw score; verl's reward loop reads ``data[-1].probs[-1]``).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.deps import get_service, require_api_key
from rewardkit.server.errors import BadRequest
from rewardkit.server.protocol import ChatMessage, ErrorResponse
from rewardkit.server.serving import RewardService

ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}
router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)  # type: ignore[arg-type]
Service = Annotated[RewardService, Depends(get_service)]


# --- OpenRLHF ---------------------------------------------------------------------------------------------------
class GetRewardRequest(BaseModel):
    query: list[str] = Field(..., min_length=1, description="full prompt+response texts, formatted by the policy")
    prompts: list[str] | None = Field(None, description="the prompt part of each query (marks where the response starts)")
    labels: list[Any] | None = None


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(req: GetRewardRequest, service: Service) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text."""
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise BadRequest(f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", field="prompts")
    items: list[ScoreItem] = []
    for i, q in enumerate(req.query):
        if not q:
            raise BadRequest(f"query[{i}] must not be empty", field=f"query[{i}]")
        start = None
        if req.prompts is not None and q.startswith(req.prompts[i]):
            start = len(req.prompts[i])
        items.append(ScoreItem(text=q, response_start=start))
    scored = await service.score(items, field="query")
    rewards = [s.score.reward for s in scored]
    return GetRewardResponse(rewards=rewards, scores=rewards, extra_logs={"rm_score": rewards})


# --- vLLM -------------------------------------------------------------------------------------------------------
class PoolingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM clients send more sampling-ish fields; ignore them
    model: str | None = None
    input: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    task: Literal["classify", "token_classify", "reward", "score"] = "classify"
    encoding_format: Literal["float"] = "float"
    activation: bool | None = None
    beta: float = Field(0.8, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one(self) -> PoolingRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be an empty list")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input must not be empty")
        return self


class PoolingData(BaseModel):
    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | list[list[float]]


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class PoolingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: PoolingUsage


def _pooling_items(inp: str | list[str] | None, messages: list[ChatMessage] | None) -> list[ScoreItem]:
    if messages is not None:
        return [ScoreItem(messages=[{"role": m.role, "content": m.content} for m in messages])]
    texts = [inp] if isinstance(inp, str) else list(inp or [])
    for i, t in enumerate(texts):
        if not t:
            raise BadRequest(f"input[{i}] must not be empty", field=f"input[{i}]")
    return [ScoreItem(text=t) for t in texts]


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(req: PoolingRequest, service: Service) -> PoolingResponse:
    """vLLM pooling API. ``classify``/``reward``: ``data = [score]``; ``token_classify``: ABC per-token rewards."""
    service.check_model(req.model)
    items = _pooling_items(req.input, req.messages)
    if req.task == "token_classify":
        data, ntok = await service.pooling_token_classify(items, req.beta)
    else:
        scored = await service.score(items, field="input")
        data = [[_act(s.score.reward, req.activation, default=False)] for s in scored]
        ntok = sum(s.score.num_tokens for s in scored)
    return PoolingResponse(id=f"pool-{uuid.uuid4().hex}", created=int(time.time()), model=service.rm.model_id,
                           data=[PoolingData(index=i, data=d) for i, d in enumerate(data)],
                           usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] | None = None
    messages: list[ChatMessage] | None = None
    activation: bool | None = Field(None, description="true: sigmoid(score) (vLLM default); false: the raw score")

    @model_validator(mode="after")
    def _one(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be an empty list")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input must not be empty")
        return self


class ClassifyData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassifyData]
    usage: PoolingUsage


def _act(x: float, activation: bool | None, default: bool) -> float:
    use = default if activation is None else activation
    if not use:
        return x
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, service: Service) -> ClassifyResponse:
    """vLLM classify API; with one label the probability is sigmoid(score), or the raw score if activation=false."""
    service.check_model(req.model)
    items = _pooling_items(req.input, req.messages)
    scored = await service.score(items, field="input")
    data = [ClassifyData(index=i, label="LABEL_0", probs=[_act(s.score.reward, req.activation, default=True)],
                         num_classes=1) for i, s in enumerate(scored)]
    ntok = sum(s.score.num_tokens for s in scored)
    return ClassifyResponse(id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=service.rm.model_id,
                            data=data, usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))
