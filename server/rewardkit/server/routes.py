"""Native API routes: /v1/rewards, /v1/models, /health, /ready."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rewardkit.server.deps import get_service, require_api_key
from rewardkit.server.errors import NotReady
from rewardkit.server.protocol import (
    ErrorResponse,
    ItemResult,
    ModelCard,
    ModelList,
    RewardRequest,
    RewardResponse,
    Status,
    Usage,
)
from rewardkit.server.serving import RewardService, set_score_headers, to_score_item

ERRORS = {code: {"model": ErrorResponse} for code in (401, 413, 422, 429, 503)}

router = APIRouter(responses=ERRORS)  # type: ignore[arg-type]
open_router = APIRouter()

Service = Annotated[RewardService, Depends(get_service)]


def encode_vector(values: np.ndarray, encoding_format: str) -> str | list[float]:
    arr = np.asarray(values, dtype="<f4")
    if encoding_format == "float":
        return [float(x) for x in arr]
    return base64.b64encode(arr.tobytes()).decode("ascii")


@router.post("/v1/rewards", response_model=RewardResponse, dependencies=[Depends(require_api_key)])
async def rewards(req: RewardRequest, service: Service, response: Response) -> RewardResponse:
    """Score items; with ``dense: true`` also return ABC token-level reward vectors."""
    service.check_model(req.model)
    items = [to_score_item(it) for it in req.items]
    if req.dense:
        results = await service.score_dense(req, items)
    else:
        scored = await service.score(items, truncate=req.truncate)
        results = [ItemResult(index=i, reward=s.score.reward, num_tokens=s.score.num_tokens,
                              truncated=s.score.truncated) for i, s in enumerate(scored)]
    set_score_headers(response, service)
    return RewardResponse(model=service.rm.model_id, head_version=service.head_version,
                          rewards=[r.reward for r in results], results=results,
                          usage=Usage(total_tokens=sum(r.num_tokens for r in results)))


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def models(service: Service) -> ModelList:
    rm = service.rm
    desc = rm.meta.description or ("trained reward model" if rm.meta.trained else "")
    if not rm.meta.trained:
        desc = "UNTRAINED reward head: " + desc
    return ModelList(data=[ModelCard(
        id=rm.model_id, head_version=service.head_version, trained=rm.meta.trained, description=desc,
        max_length=service.settings.max_length, dtype=str(rm.dtype).replace("torch.", ""), device=str(rm.device),
        reward_token_rule=rm.meta.reward_token_rule, norm_mean=rm.meta.norm_mean, norm_std=rm.meta.norm_std)])


@open_router.get("/health", response_model=Status)
async def health() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@open_router.get("/ready", response_model=Status, responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> Status | JSONResponse:
    """Readiness: the model is loaded and the server accepts work."""
    st = request.app.state.rk
    if st.load_error:
        raise NotReady(f"model failed to load: {st.load_error}", retry_after=30.0)
    if st.service is None or st.shutting_down:
        raise NotReady("model loading" if st.service is None else "shutting down", retry_after=5.0)
    return Status(status="ready")
