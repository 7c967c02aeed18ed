"""Operations routes (thin): ``GET /metrics`` (Prometheus text; the API key when ``metrics_require_auth`` is set),
``GET /v1/drift?scope=local|fleet[&run=ID]``, ``GET /v1/runs``, ``POST /v1/drift/reference/pin`` and ``/reset``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from rewardkit.server.deps import app_state, get_service, require_api_key, require_metrics_key
from rewardkit.server.errors import NotReady
from rewardkit.server.ops import serving
from rewardkit.server.ops.protocol import DriftActionResponse, DriftResponse, RunList
from rewardkit.server.protocol import error_responses
from rewardkit.server.service import RewardService

router = APIRouter(responses=error_responses(401, 422, 503))


@router.get("/metrics", dependencies=[Depends(require_metrics_key)], response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this replica (text exposition format)."""
    st = app_state(request)
    if st.metrics is None:
        raise NotReady("metrics are not configured", retry_after=5.0)
    serving.refresh_gauges(st)
    body, content_type = st.metrics.render()
    return Response(content=body, media_type=content_type)


Service = Annotated[RewardService, Depends(get_service)]


@router.get("/v1/drift", response_model=DriftResponse, dependencies=[Depends(require_api_key)])
async def drift(request: Request, service: Service,
                scope: Annotated[Literal["local", "fleet"], Query(description="this replica, or all via Redis")] = "local",
                run: Annotated[str | None, Query(description="one run's own drift (x-rewardkit-run / run_id)")] = None,
                ) -> DriftResponse:
    """Reward drift and hacking signals over the sliding window (PSI, KS, shifts, length correlation, collapse);
    with ``run``, that run's rewards against that run's own first rewards."""
    if run is not None:
        return serving.run_drift(service, run, scope)
    return await serving.drift(request, service, scope)


@router.get("/v1/runs", response_model=RunList, dependencies=[Depends(require_api_key)])
async def runs(service: Service) -> RunList:
    """The runs this replica has scored for (at most ``max_runs``, then ``other``), with items and last step."""
    return serving.run_list(service)


@router.post("/v1/drift/reference/pin", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_pin(request: Request, service: Service) -> DriftActionResponse:
    """Make the current window the drift reference (e.g. after validating a new policy checkpoint)."""
    return await serving.drift_action(request, service, "pin")


@router.post("/v1/drift/reference/reset", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_reset(request: Request, service: Service) -> DriftActionResponse:
    """Drop the drift reference; it refills automatically from the next rewards."""
    return await serving.drift_action(request, service, "reset")
