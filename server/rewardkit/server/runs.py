"""Run identity: which training run (and step) a request scores for, so one server can watch many runs apart.

A request names its run with the header ``x-rewardkit-run`` (every endpoint, compatibility ones included) or the
native API's body field ``run_id`` (the body wins); ``x-rewardkit-step`` / ``step`` give the trainer's step. The
middleware puts the headers' run in a context variable for the request's task (``RUN``); the native handler may
replace it with the body's. ``RewardService.observe_drift`` feeds the run's own :class:`DriftMonitor` (reference:
that run's first ``drift_reference_size`` rewards) besides the global one, which is unchanged.

Bounded: at most ``max_runs`` distinct runs get their own monitor and their own Prometheus series; later ones fold
into ``other`` (``RunRegistry.OTHER``), so a client cannot grow the label set. An API key may be bound to a run
prefix (``KEY run=PREFIX`` in the keys file): its requests must name a run that starts with it (403 otherwise).
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar

from rewardkit.server.drift import DriftMonitor
from rewardkit.server.errors import BadRequest, Forbidden

RUN_HEADER = "x-rewardkit-run"
STEP_HEADER = "x-rewardkit-step"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$")
MAX_STEP = 2**53


@dataclasses.dataclass(frozen=True)
class RunTag:
    run_id: str
    step: int | None = None


RUN: ContextVar[RunTag | None] = ContextVar("rewardkit_run", default=None)
RUN_PREFIX: ContextVar[str | None] = ContextVar("rewardkit_run_prefix", default=None)  # the API key's binding


def check_run_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not RUN_ID_RE.match(value):
        raise BadRequest(f"{field}: a run id is 1-64 characters of letters, digits and ._:/@+- (starting with a letter "
                         f"or digit), got {str(value)[:80]!r}", field=field)
    return value


def check_step(value: object, field: str) -> int:
    if isinstance(value, str):
        text = value
        try:
            value = int(text)
        except ValueError:
            raise BadRequest(f"{field}: a step is an integer >= 0, got {text[:40]!r}", field=field) from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEP:
        raise BadRequest(f"{field}: a step is an integer in [0, 2^53], got {value!r}", field=field)
    return value


def tag_from_headers(headers: Sequence[tuple[bytes, bytes]]) -> RunTag | None:
    """The run named by a request's headers (raw ASGI pairs), or None. Raises BadRequest on a malformed value."""
    run = step = None
    for k, v in headers:
        if k == RUN_HEADER.encode():
            run = v.decode("latin-1").strip()
        elif k == STEP_HEADER.encode():
            step = v.decode("latin-1").strip()
    if run is None:
        if step is not None:
            raise BadRequest(f"{STEP_HEADER} needs {RUN_HEADER}: a step belongs to a run", field=STEP_HEADER)
        return None
    return RunTag(check_run_id(run, RUN_HEADER), None if step is None else check_step(step, STEP_HEADER))


def check_prefix(tag: RunTag | None, prefix: str | None, field: str) -> None:
    """A key bound to ``prefix`` may only score for runs that start with it."""
    if prefix is None:
        return
    if tag is None or not tag.run_id.startswith(prefix):
        got = "no run" if tag is None else repr(tag.run_id)
        raise Forbidden(f"{field}: this API key may only score runs starting with {prefix!r}, got {got}", field=field)


@dataclasses.dataclass
class RunInfo:
    run_id: str
    items: int = 0
    requests: int = 0
    last_step: int | None = None
    first_seen: float = dataclasses.field(default_factory=time.time)
    last_seen: float = dataclasses.field(default_factory=time.time)


class RunRegistry:
    """Per-run drift monitors and counters, at most ``max_runs`` of them plus ``other``. Thread-safe."""

    OTHER = "other"

    def __init__(self, max_runs: int, make_monitor: Callable[[], DriftMonitor]) -> None:
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        self.max_runs = max_runs
        self._make = make_monitor
        self._monitors: dict[str, DriftMonitor] = {}
        self._info: dict[str, RunInfo] = {}
        self._lock = threading.Lock()

    def label(self, run_id: str) -> str:
        """The series a run is counted under: itself, or ``other`` once ``max_runs`` runs are known."""
        with self._lock:
            if run_id in self._monitors or run_id == self.OTHER:
                return run_id
            return run_id if len(self._monitors) < self.max_runs else self.OTHER

    def observe(self, tag: RunTag, rewards: Sequence[float], lengths: Sequence[int],
                groups: Sequence[str | None] | None) -> str:
        name = self.label(tag.run_id)
        with self._lock:
            mon = self._monitors.get(name)
            if mon is None:
                mon = self._monitors[name] = self._make()
                self._info[name] = RunInfo(name)
            info = self._info[name]
            info.items += len(rewards)
            info.requests += 1
            info.last_seen = time.time()
            if tag.step is not None and name != self.OTHER:
                info.last_step = tag.step if info.last_step is None else max(info.last_step, tag.step)
        mon.observe(rewards, lengths, groups)
        return name

    def monitor(self, run_id: str) -> DriftMonitor | None:
        with self._lock:
            return self._monitors.get(run_id)

    def runs(self) -> list[RunInfo]:
        with self._lock:
            return [dataclasses.replace(i) for i in self._info.values()]

    def items(self) -> list[tuple[str, DriftMonitor]]:
        with self._lock:
            return list(self._monitors.items())
