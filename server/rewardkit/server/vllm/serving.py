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
from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.errors import BadRequest
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


async def pooling(registry: ModelRegistry, req: PoolingRequest, request: Request,
                  response: Response) -> PoolingResponse:
    """vLLM pooling API. ``classify``/``reward``: ``data = [score]`` (raw unless ``use_activation``);
    ``token_classify``: ABC per-token rewards (one model: not with a default composition)."""
    sigmoid = req.use_sigmoid(default=False)
    items = req.items()
    if req.task == "token_classify":
        target = registry.compat_parts(req.model)
        if not isinstance(target, RewardService):
            raise BadRequest("task: token_classify (ABC dense rewards) comes from one model, and this server's "
                             "default is a composition (default_rewards); name a model in `model`", field="task")
        data, ntok = await token_classify(target, items, req.beta)
        set_score_headers(response, target)
        model = target.rm.model_id
    else:
        done = await registry.compat_rewards(req.model, items, None, req.truncate(), "input")
        data = [[_act(r, sigmoid)] for r in done.rewards]
        ntok = done.num_tokens
        model = registry.set_headers(response, done)
    return PoolingResponse(id=_echo_id(response, req.response_id("pool", request)), created=int(time.time()),
                           model=model, data=[PoolingData(index=i, data=d) for i, d in enumerate(data)],
                           usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))


async def classify(registry: ModelRegistry, req: ClassifyRequest, request: Request,
                   response: Response) -> ClassifyResponse:
    """vLLM classify API; with one label the probability is sigmoid(score) (vLLM's default), or the raw score with
    ``use_activation: false`` (or the older ``activation: false``)."""
    sigmoid = req.use_sigmoid(default=True)
    done = await registry.compat_rewards(req.model, req.items(), None, req.truncate(), "input")
    data = [ClassifyData(index=i, label="LABEL_0", probs=[_act(r, sigmoid)], num_classes=1)
            for i, r in enumerate(done.rewards)]
    ntok = done.num_tokens
    model = registry.set_headers(response, done)
    return ClassifyResponse(id=_echo_id(response, req.response_id("classify", request)), created=int(time.time()),
                            model=model, data=data, usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))


async def embeddings(registry: ModelRegistry, req: EmbeddingsRequest, request: Request,
                     response: Response) -> EmbeddingsResponse:
    """SGLang-compatible reward endpoint: ``data[i].embedding == [raw score]`` (read ``embedding[-1]``)."""
    done = await registry.compat_rewards(req.model, req.items(), None, req.truncate(), "input")
    ntok = done.num_tokens
    model = registry.set_headers(response, done)
    return EmbeddingsResponse(id=_echo_id(response, req.response_id("embd", request)), created=int(time.time()),
                              model=model,
                              data=[EmbeddingData(index=i, embedding=[r]) for i, r in enumerate(done.rewards)],
                              usage=PoolingUsage(prompt_tokens=ntok, total_tokens=ntok))
