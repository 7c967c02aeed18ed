"""Response models of the drift routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class DriftResponse(BaseModel):
    """A drift snapshot (fields: see rewardkit.server.drift) with where it comes from."""

    model: str
    head_version: str
    scope: Literal["local", "fleet"]
    replicas: int
    snapshot: dict[str, Any]
    run: str | None = None  # the run's own monitor (?run=), None: all traffic


class RunSummary(BaseModel):
    run: str
    items: int
    requests: int
    last_step: int | None
    first_seen: float
    last_seen: float


class RunList(BaseModel):
    max_runs: int
    runs: list[RunSummary]


class DriftActionResponse(BaseModel):
    model: str
    action: Literal["pin", "reset"]
    replicas_notified: int
    snapshot: dict[str, Any]
