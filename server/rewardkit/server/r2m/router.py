"""``/v1/r2m/*`` routes (thin). Bodies of ``/feedback`` and ``/rewards`` are RKF1 streams
(``application/octet-stream``), read with ``request.stream()`` so that memory stays bounded whatever the body size.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from rewardkit.server.deps import app_state, check_service, require_api_key
from rewardkit.server.errors import BadRequest, NotReady
from rewardkit.server.protocol import error_responses
from rewardkit.server.r2m import serving
from rewardkit.server.r2m.protocol import FeedbackResponse, HeadList, R2MRewardResponse, R2MStatus
from rewardkit.server.r2m.serving import R2MService

router = APIRouter(prefix="/v1/r2m", tags=["r2m"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401, 404, 413, 415, 422, 429, 503))


BINARY = {"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                          "required": True}}


async def get_r2m(request: Request) -> R2MService:
    """The R2M service (a dependency: async, no I/O, so FastAPI does not hand it to its thread pool)."""
    check_service(request)  # 503 while loading / shutting down
    st = app_state(request)
    r2m = st.r2m
    if r2m is None:
        raise NotReady(st.r2m_error or "R2M is disabled on this server (REWARDKIT_R2M_ENABLED=false)",
                       retry_after=5.0)
    return r2m  # type: ignore[no-any-return]


R2M = Annotated[R2MService, Depends(get_r2m)]


def _check_binary(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise _UnsupportedMedia(f"send the RKF1 stream as application/octet-stream (got {ctype or 'none'!r})", "body")


class _UnsupportedMedia(BadRequest):
    status = 415
    type = "unsupported_media_type"


@router.post("/feedback", response_model=FeedbackResponse, openapi_extra=BINARY)
async def feedback(request: Request, r2m: R2M,
                   flush: Annotated[bool, Query(description="complete every group of this stream now")] = False
                   ) -> FeedbackResponse:
    """Stream policy hidden states (RKF1 frames) into the online updater."""
    _check_binary(request)
    return await r2m.ingest(request.stream(), flush=flush)


@router.post("/rewards", response_model=R2MRewardResponse, openapi_extra=BINARY)
async def rewards(request: Request, r2m: R2M, response: Response) -> R2MRewardResponse:
    """Rewards from the active R2M head for items + their policy hidden states (RKF1 frames)."""
    _check_binary(request)
    out = await r2m.rewards(request.stream())
    response.headers["x-rewardkit-model"] = out.model
    response.headers["x-rewardkit-head-version"] = out.head_version
    return out


@router.get("/heads", response_model=HeadList)
async def heads(r2m: R2M) -> HeadList:
    """Every stored head version, oldest first, and which one is active."""
    return await asyncio.to_thread(serving.head_list, r2m)


@router.post("/heads/{version}/activate", response_model=HeadList)
async def activate(version: str, r2m: R2M) -> HeadList:
    """Make a stored version the active head (rollback). Unknown version: 404."""
    return await serving.activate(r2m, version)


@router.get("/status", response_model=R2MStatus)
async def status(r2m: R2M) -> R2MStatus:
    """Active version, queue kind, pending groups and frames, updates applied and rejected, the last error."""
    return serving.status(r2m)
