"""vLLM pooling API and SGLang embeddings routes (thin).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.deps import get_registry, require_api_key
from rewardkit.server.protocol import ERRORS
from rewardkit.server.vllm import serving
from rewardkit.server.vllm.protocol import (
    ClassifyRequest,
    ClassifyResponse,
    EmbeddingsRequest,
    EmbeddingsResponse,
    PoolingRequest,
    PoolingResponse,
)

router = APIRouter(dependencies=[Depends(require_api_key)], responses=ERRORS)


Registry = Annotated[ModelRegistry, Depends(get_registry)]


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(req: PoolingRequest, registry: Registry, request: Request, response: Response) -> PoolingResponse:
    """vLLM pooling API. ``classify``/``reward``: ``data = [score]`` (raw unless ``use_activation``);
    ``token_classify``: ABC per-token rewards."""
    return await serving.pooling(registry, req, request, response)


@router.post("/classify", response_model=ClassifyResponse)
async def classify(req: ClassifyRequest, registry: Registry, request: Request, response: Response) -> ClassifyResponse:
    """vLLM classify API; with one label the probability is sigmoid(score) (vLLM's default), or the raw score with
    ``use_activation: false`` (or the older ``activation: false``)."""
    return await serving.classify(registry, req, request, response)


@router.post("/v1/embeddings", response_model=EmbeddingsResponse)
async def embeddings(req: EmbeddingsRequest, registry: Registry, request: Request,
                     response: Response) -> EmbeddingsResponse:
    """SGLang-compatible reward endpoint: ``data[i].embedding == [raw score]`` (read ``embedding[-1]``)."""
    return await serving.embeddings(registry, req, request, response)
