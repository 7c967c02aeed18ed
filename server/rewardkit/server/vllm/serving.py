"""The work behind the vLLM/SGLang endpoints: scores (raw or through a sigmoid), ABC ``token_classify`` vectors, echoed
request ids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Request, Response

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.service import RewardService, set_score_headers
from rewardkit.server.vllm.protocol import (
    ClassifyData,
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    PoolingUsage,
)


def _echo_id(response: Response, rid: str) -> str:
    response.headers["x-request-id"] = rid.split("-", 1)[1]
    return rid


def _act(x: float, sigmoid: bool) -> float:
    if not sigmoid:
        return x
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


async def token_classify(service: RewardService, items: Sequence[ScoreItem], beta: float) -> tuple[list[Any], int]:
    """vLLM ``token_classify``: per item, ``[[r_t], ...]`` over the response tokens (the whole text for ``input``
    items), the same vector as ``/v1/rewards`` dense. Returns (data, total tokens)."""
    done = await service.dense(items, beta, None, "input")
    data = [[[float(x)] for x in d.token_rewards.astype("<f4")] for _, _, d, _ in done]
    return data, sum(s.num_tokens for _, s, _, _ in done)


async def pooling(service: RewardService, req: PoolingRequest, request: Request, response: Response) -> PoolingResponse:
    """vLLM pooling API. ``classify``/``reward``: ``data = [score]`` (raw unless ``use_activation``);
    ``token_classify``: ABC per-token rewards."""
    service.check_model(req.model)
    sigmoid = req.use_sigmoid(default=False)
    items = req.items()
    if req.task == "token_classify":
        data, ntok = await token_classify(service, items, req.beta)
    else:
        scored = await service.score(items, truncate=req.truncate(), field="input")
        data = [[_act(s.score.reward, sigmoid)] for s in scored]
        ntok = sum(s.score.num_tokens for s in scored)
    set_score_headers(response, service)
    return PoolingResponse(id=_echo_id(response, req.response_id("pool", request)), created=int(time.time()),
                           model=service.rm.model_id, data=[PoolingData(index=i, data=d) for i, d in enumerate(data)],
                           usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))


async def classify(service: RewardService, req: ClassifyRequest, request: Request, response: Response) -> ClassifyResponse:
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


async def embeddings(service: RewardService, req: EmbeddingsRequest, request: Request,
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
