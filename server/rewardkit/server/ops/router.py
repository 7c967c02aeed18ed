"""Operations routes (thin): ``GET /metrics`` (Prometheus text; the API key when ``metrics_require_auth`` is set),
``GET /v1/drift?scope=local|fleet[&run=ID][&model=NAME]``, ``GET /v1/runs``, ``POST /v1/drift/reference/pin`` and
``/reset`` (each with ``model=NAME`` for a served model other than the first).
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
Model = Annotated[str | None, Query(description="a served model's name (--model NAME=PATH); default: the first")]


@router.get("/v1/drift", response_model=DriftResponse, dependencies=[Depends(require_api_key)])
async def drift(request: Request, service: Service,
                scope: Annotated[Literal["local", "fleet"], Query(description="this replica, or all via Redis")] = "local",
                run: Annotated[str | None, Query(description="one run's own drift (x-rewardkit-run / run_id)")] = None,
                model: Model = None) -> DriftResponse:
    """Reward drift and hacking signals over the sliding window (PSI, KS, shifts, length correlation, collapse);
    with ``run``, that run's rewards against that run's own first rewards; with ``model``, that served model's."""
    label, svc = serving.pick(request, model)
    if run is not None:
        return await serving.run_drift(request, svc, run, scope, label)
    return await serving.drift(request, svc, scope, label)


@router.get("/v1/runs", response_model=RunList, dependencies=[Depends(require_api_key)])
async def runs(request: Request, service: Service, model: Model = None) -> RunList:
    """The runs this replica has scored for (at most ``max_runs``, then ``other``), with items and last step."""
    return serving.run_list(serving.pick(request, model)[1])


@router.post("/v1/drift/reference/pin", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_pin(request: Request, service: Service, model: Model = None) -> DriftActionResponse:
    """Make the current window the drift reference (e.g. after validating a new policy checkpoint)."""
    label, svc = serving.pick(request, model)
    return await serving.drift_action(request, svc, "pin", label)


@router.post("/v1/drift/reference/reset", response_model=DriftActionResponse, dependencies=[Depends(require_api_key)])
async def drift_reset(request: Request, service: Service, model: Model = None) -> DriftActionResponse:
    """Drop the drift reference; it refills automatically from the next rewards."""
    label, svc = serving.pick(request, model)
    return await serving.drift_action(request, svc, "reset", label)
