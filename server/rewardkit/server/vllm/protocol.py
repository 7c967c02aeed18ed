"""vLLM's pooling API (``/pooling``, ``/classify``) and SGLang-style ``/v1/embeddings``: request mixins and models.
Unknown fields are ignored, as those servers do; a field we know but cannot honour is a 422 naming it.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.errors import BadRequest
from rewardkit.server.protocol import ChatMessage, check_count


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
