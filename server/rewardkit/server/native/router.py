"""Native API routes (thin): ``/v1/rewards``, ``/v1/models``, ``/health``, ``/ready``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from rewardkit.server.compose.serving import ModelRegistry
from rewardkit.server.deps import get_registry, require_api_key
from rewardkit.server.errors import NotReady
from rewardkit.server.native import serving
from rewardkit.server.native.protocol import ModelList, RewardRequest, RewardResponse
from rewardkit.server.protocol import ERRORS, Status, error_responses

router = APIRouter(responses=ERRORS)


open_router = APIRouter()


Registry = Annotated[ModelRegistry, Depends(get_registry)]


@router.post("/v1/rewards", response_model=RewardResponse, dependencies=[Depends(require_api_key)])
async def rewards(req: RewardRequest, registry: Registry, response: Response) -> RewardResponse:
    """Score items with one model, or compose models and components (``rewards``); with ``dense: true`` also
    return ABC token-level reward vectors."""
    return await serving.rewards(registry, req, response)


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(require_api_key)])
async def models(registry: Registry) -> ModelList:
    """The served models (id, name, head version, trained or not, what each scores) and the components."""
    return serving.model_list(registry)


@open_router.get("/health", response_model=Status)
async def health() -> Status:
    """Liveness: the process answers."""
    return Status(status="ok")


@open_router.get("/ready", response_model=Status, responses=error_responses(503))
async def ready(request: Request) -> Status | JSONResponse:
    """Readiness: the model is loaded and the server accepts work."""
    st = request.app.state.rk
    if st.load_error:
        raise NotReady(f"model failed to load: {st.load_error}", retry_after=30.0)
    if st.service is None or st.shutting_down:
        raise NotReady("model loading" if st.service is None else "shutting down", retry_after=5.0)
    return Status(status="ready")
