"""Drop-in endpoints for what RL trainers already speak (docs/integrations.md has one section per trainer).

- OpenRLHF remote reward model: ``POST /get_reward`` (``openrlhf/cli/serve_rm.py``'s contract; an empty shard, which
  OpenRLHF's multi-URL split can send, answers 200 with empty lists).
- vLLM pooling API for reward models: ``POST /pooling`` (task ``classify`` / ``reward`` / ``token_classify``) and
  ``POST /classify``. ``use_activation`` (vLLM >= 0.11.2) or the older ``activation``: false returns the raw score,
  true its sigmoid; ``/classify`` defaults to the sigmoid as vLLM does, ``/pooling`` to the raw score. verl's reward
  loop reads ``data[-1].probs[-1]`` from ``/classify``.
- SGLang-style ``POST /v1/embeddings``: the raw score is the last element of ``data[i].embedding`` (verl's SGLang
  reward path reads ``data[-1].embedding[-1]``).

Unknown fields in the vLLM/SGLang bodies are ignored, as those servers do; a field we know but cannot honour (token-id
input, ``priority`` other than 0, ``dimensions``, a non-float ``encoding_format``) is a 422 naming it.
Every scoring response carries ``x-rewardkit-model`` and ``x-rewardkit-head-version``.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.deps import get_service, require_api_key
from rewardkit.server.errors import BadRequest
from rewardkit.server.protocol import ChatMessage, ErrorResponse, check_count
from rewardkit.server.serving import RewardService, set_score_headers

ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}
router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)  # type: ignore[arg-type]
Service = Annotated[RewardService, Depends(get_service)]


# --- OpenRLHF ---------------------------------------------------------------------------------------------------
class GetRewardRequest(BaseModel):
    query: list[str] = Field(..., description="full prompt+response texts, formatted by the policy (may be empty)")
    prompts: list[str] | None = Field(None, description="the prompt part of each query (marks where the response starts)")
    labels: list[Any] | None = None

    @field_validator("query", "prompts", "labels", mode="before")
    @classmethod
    def _count(cls, v: Any, info: Any) -> Any:
        return check_count(v, info.field_name)


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


@router.post("/get_reward", response_model=GetRewardResponse)
async def get_reward(req: GetRewardRequest, service: Service, response: Response) -> GetRewardResponse:
    """OpenRLHF's remote reward-model protocol: one reward per query text."""
    if req.prompts is not None and len(req.prompts) != len(req.query):
        raise BadRequest(f"prompts has {len(req.prompts)} entries but query has {len(req.query)}", field="prompts")
    set_score_headers(response, service)
    if not req.query:  # an empty shard from OpenRLHF's multi-URL split: nothing to score
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


# --- vLLM and SGLang ---------------------------------------------------------------------------------------------
class _CompatRequest(BaseModel):
    """Fields every vLLM pooling-family request shares (vLLM's ``PoolingBasicRequestMixin`` + completion/chat
    mixins). Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="plain-text input: add the tokenizer's special tokens (BOS)")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="keep only the last N tokens; -1: max_length")
    request_id: str | None = Field(None, max_length=256, description="echoed in the response id and x-request-id")
    priority: int = 0
    user: str | None = None
    dimensions: int | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _count(cls, v: Any) -> Any:
        return check_count(v, "input")

    @field_validator("input")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list) and v and (isinstance(v[0], int) or (isinstance(v[0], list))):
            raise ValueError("token-id input is not supported: send the text (the server tokenizes with the reward "
                             "model's own tokenizer)")
        return v

    @field_validator("priority")
    @classmethod
    def _no_priority(cls, v: int) -> int:
        if v != 0:
            raise ValueError("priority scheduling is not supported: send priority 0 or omit it")
        return v

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("dimensions is not supported: a reward model returns one score per input")
        return v

    @model_validator(mode="after")
    def _one(self) -> _CompatRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of input or messages")
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be an empty list")
        if isinstance(self.input, str) and not self.input:
            raise ValueError("input must not be empty")
        return self

    def items(self) -> list[ScoreItem]:
        keep = self.truncate_prompt_tokens if self.truncate_prompt_tokens not in (None, -1, 0) else None
        if self.messages is not None:
            return [ScoreItem(messages=[{"role": m.role, "content": m.content} for m in self.messages],
                              keep_last_tokens=keep)]
        texts = [self.input] if isinstance(self.input, str) else list(self.input or [])
        for i, t in enumerate(texts):
            if not t:
                raise BadRequest(f"input[{i}] must not be empty", field=f"input[{i}]")
        return [ScoreItem(text=str(t), add_special_tokens=self.add_special_tokens, keep_last_tokens=keep)
                for t in texts]

    def truncate(self) -> bool | None:
        """``truncate_prompt_tokens=-1`` asks to truncate to the model's length even when the server refuses."""
        return True if self.truncate_prompt_tokens == -1 else None

    def response_id(self, prefix: str, request: Request) -> str:
        rid = self.request_id or request.headers.get("x-request-id") or uuid.uuid4().hex
        return f"{prefix}-{rid}"


class _ActivationMixin(BaseModel):
    use_activation: bool | None = Field(None, description="vLLM >= 0.11.2: true = sigmoid(score), false = raw score")
    activation: bool | None = Field(None, description="the name before vLLM 0.11.2; same meaning as use_activation")

    def use_sigmoid(self, default: bool) -> bool:
        if self.use_activation is not None and self.activation is not None and self.use_activation != self.activation:
            raise BadRequest(f"use_activation={self.use_activation} and activation={self.activation} disagree; "
                             "send one of them (activation is the pre-0.11.2 name)", field="use_activation")
        for v in (self.use_activation, self.activation):
            if v is not None:
                return v
        return default


class PoolingRequest(_CompatRequest, _ActivationMixin):
    task: Literal["classify", "token_classify", "reward", "score"] = "classify"
    encoding_format: Literal["float"] = "float"
    beta: float = Field(0.8, ge=0.0, le=1.0)


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


def _echo_id(response: Response, rid: str) -> str:
    response.headers["x-request-id"] = rid.split("-", 1)[1]
    return rid


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(req: PoolingRequest, service: Service, request: Request, response: Response) -> PoolingResponse:
    """vLLM pooling API. ``classify``/``reward``: ``data = [score]`` (raw unless ``use_activation``);
    ``token_classify``: ABC per-token rewards."""
    service.check_model(req.model)
    sigmoid = req.use_sigmoid(default=False)
    items = req.items()
    if req.task == "token_classify":
        data, ntok = await service.pooling_token_classify(items, req.beta)
    else:
        scored = await service.score(items, truncate=req.truncate(), field="input")
        data = [[_act(s.score.reward, sigmoid)] for s in scored]
        ntok = sum(s.score.num_tokens for s in scored)
    set_score_headers(response, service)
    return PoolingResponse(id=_echo_id(response, req.response_id("pool", request)), created=int(time.time()),
                           model=service.rm.model_id, data=[PoolingData(index=i, data=d) for i, d in enumerate(data)],
                           usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))


class ClassifyRequest(_CompatRequest, _ActivationMixin):
    pass


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


def _act(x: float, sigmoid: bool) -> float:
    if not sigmoid:
        return x
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, service: Service, request: Request, response: Response) -> ClassifyResponse:
    """vLLM classify API; with one label the probability is sigmoid(score) (vLLM's default), or the raw score with
    ``use_activation: false`` (or the older ``activation: false``)."""
    service.check_model(req.model)
    sigmoid = req.use_sigmoid(default=True)
    scored = await service.score(req.items(), truncate=req.truncate(), field="input")
    data = [ClassifyData(index=i, label="LABEL_0", probs=[_act(s.score.reward, sigmoid)], num_classes=1)
            for i, s in enumerate(scored)]
    ntok = sum(s.score.num_tokens for s in scored)
    set_score_headers(response, service)
    return ClassifyResponse(id=_echo_id(response, req.response_id("classify", request)), created=int(time.time()),
                            model=service.rm.model_id, data=data, usage=PoolingUsage(prompt_tokens=ntok,
                                                                                     total_tokens=ntok))


class EmbeddingsRequest(_CompatRequest):
    """OpenAI/SGLang embeddings body. For a reward model SGLang returns the score as the embedding's last element."""

    encoding_format: Literal["float"] = "float"


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float]


class EmbeddingsResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(req: EmbeddingsRequest, service: Service, request: Request,
                     response: Response) -> EmbeddingsResponse:
    """SGLang-compatible reward endpoint: ``data[i].embedding == [raw score]`` (read ``embedding[-1]``)."""
    service.check_model(req.model)
    scored = await service.score(req.items(), truncate=req.truncate(), field="input")
    ntok = sum(s.score.num_tokens for s in scored)
    set_score_headers(response, service)
    return EmbeddingsResponse(id=_echo_id(response, req.response_id("embd", request)), created=int(time.time()),
                              model=service.rm.model_id,
                              data=[EmbeddingData(index=i, embedding=[s.score.reward]) for i, s in enumerate(scored)],
                              usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))
