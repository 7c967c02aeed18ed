"""Several reward models and components in one server: picking a model by name, and composed requests.

A composition is ``{name: weight}`` over the served models (``default`` = the first ``--model``) and the
components (``rewardkit.server.compose.components``). Each item's reward is ``sum(weight * part)``; each part's
value is returned too. An item that one part cannot score (too long for one model, no reference for a match check)
gets that part's error and ``reward: null``; the other items and parts are still scored. Overload (429) and
readiness (503) stay whole-request errors.

The models run at once: each has its own scheduler, and their batches take turns on the one torch thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from rewardkit.core.formatting import ScoreItem
from rewardkit.server.compose.components import Component, ComponentError, build_components
from rewardkit.server.errors import BadRequest, PayloadTooLarge
from rewardkit.server.runs import RUN, RUN_HEADER, RUN_PREFIX, check_prefix
from rewardkit.server.service import RewardService, ScoredItem, set_score_headers
from rewardkit.server.settings import MAX_WEIGHT, Settings

MAX_PARTS = 16  # names in one composition


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    weight: float
    service: RewardService | None = None
    component: Component | None = None


@dataclasses.dataclass
class Composed:
    """One item's composed result: ``reward`` is None when any part has an error."""

    reward: float | None
    components: dict[str, float | None]
    errors: dict[str, str]
    num_tokens: int = 0
    truncated: bool = False


class ModelRegistry:
    """The served models by name (the primary under ``default``), the components, the default composition."""

    def __init__(self, settings: Settings, primary: RewardService, extra: Mapping[str, RewardService]) -> None:
        self.settings = settings
        self.primary = primary
        self.extra = dict(extra)
        self.components = build_components(settings.components)
        self.default_rewards = dict(settings.default_rewards)
        # resolved once: the settings checked the names, and the served models do not change
        self.default_parts = self.resolve(self.default_rewards, "default_rewards") if self.default_rewards else []

    # -- names ------------------------------------------------------------------------------------------------
    def services(self) -> list[tuple[str, RewardService]]:
        """(name, service), the primary first."""
        return [(self.settings.model_name or "default", self.primary), *self.extra.items()]

    def monitored(self) -> list[tuple[str, RewardService]]:
        """(label, service) for drift, runs and their metrics: each model under its model id, or, when two served
        models share one id (two copies of a checkpoint), a later one under ``NAME:model_id``."""
        out: list[tuple[str, RewardService]] = []
        for name, svc in self.services():
            label = svc.rm.model_id
            out.append((f"{name}:{label}" if any(lb == label for lb, _ in out) else label, svc))
        return out

    def names(self) -> list[str]:
        return [*self.settings.model_names_configured(), *self.components]

    def find(self, name: str) -> RewardService | None:
        if name in ("", "default") or name == self.settings.model_name:
            return self.primary
        if name in self.extra:
            return self.extra[name]
        stripped = name.rstrip("/")
        for svc in (self.primary, *self.extra.values()):
            if name in self.aliases(svc) or stripped in self.aliases(svc):
                return svc
        return None

    def aliases(self, svc: RewardService) -> list[str]:
        if svc is self.primary:
            return svc.model_names()
        path = next(p for n, p in self.settings.extra_models.items() if self.extra[n] is svc)
        return list(dict.fromkeys([svc.rm.model_id, path, path.rstrip("/"), os.path.abspath(path)]))

    def pick(self, model: str | None, field: str = "model") -> RewardService:
        """The service ``model`` names (None: the primary), or a 400 that lists the names."""
        if model is None:
            return self.primary
        svc = self.find(model)
        if svc is None:
            names = ", ".join(repr(n) for n in [*self.settings.model_names_configured(), self.primary.rm.model_id,
                                                 *self.settings.served_model_name])
            raise BadRequest(f"{field}: this server does not serve {model!r}; send one of {names}, omit the field, "
                             "or start the server with --served-model-name", field=field)
        return svc

    def resolve(self, weights: Mapping[str, float], field: str = "rewards") -> list[Part]:
        """A composition's parts; unknown names, too many parts and bad weights are 400s naming the entry."""
        if not weights:
            raise BadRequest(f"{field}: give at least one name: weight", field=field)
        if len(weights) > MAX_PARTS:
            raise PayloadTooLarge(f"{field}: {len(weights)} parts exceeds the limit of {MAX_PARTS}", field=field)
        parts = []
        for name, w in weights.items():
            where = f"{field}.{name}"
            if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT):
                raise BadRequest(f"{where}: a weight is finite and within +-{MAX_WEIGHT:g}, got {w}", field=where)
            if name in self.components:
                parts.append(Part(name, float(w), component=self.components[name]))
                continue
            svc = self.find(name)
            if svc is None:
                raise BadRequest(f"{where}: {name!r} is neither a model ({', '.join(self.settings.model_names_configured())}) "
                                 f"nor a component ({', '.join(self.components)}); GET /v1/models lists them",
                                 field=where)
            parts.append(Part(name, float(w), service=svc))
        services = [p.service for p in parts if p.service is not None]
        if len(set(map(id, services))) != len(services):
            raise BadRequest(f"{field}: names the same model twice", field=field)
        return parts

    # -- composed scoring -------------------------------------------------------------------------------------
    async def compose(self, parts: Sequence[Part], items: Sequence[ScoreItem], references: Sequence[str | None],
                      truncate: bool | None = None, field: str = "items") -> list[Composed]:
        check_prefix(RUN.get(), RUN_PREFIX.get(), RUN_HEADER)
        self.primary.check_items_count(len(items), field)
        models = [p for p in parts if p.service is not None]
        scored: list[list[ScoredItem | str]] = list(await asyncio.gather(
            *(p.service.score_each(items, truncate, field) for p in models if p.service is not None)))
        responses = [response_text(it) for it in items]
        metrics = self.primary.metrics
        out = []
        for i in range(len(items)):
            comps: dict[str, float | None] = {}
            errors: dict[str, str] = {}
            ntok, truncated = 0, False
            for p, res in zip(models, scored, strict=True):
                r = res[i]
                if isinstance(r, str):
                    comps[p.name], errors[p.name] = None, r
                else:
                    comps[p.name] = r.score.reward
                    ntok += r.score.num_tokens
                    truncated = truncated or r.score.truncated
            for p in parts:
                if p.component is None:
                    continue
                try:
                    comps[p.name] = p.component.score(responses[i], references[i])
                except ComponentError as exc:
                    comps[p.name], errors[p.name] = None, f"{field}[{i}]: {exc}"
            total = None if errors else sum(p.weight * (comps[p.name] or 0.0) for p in parts)
            if metrics is not None:
                for name in errors:  # part names come from the config: bounded
                    metrics.component_errors_total.labels(part=name).inc()
            out.append(Composed(total, {p.name: comps[p.name] for p in parts}, errors, ntok, truncated))
        return out

    def compat_parts(self, model: str | None, field: str = "model") -> list[Part] | RewardService:
        """What a compatibility endpoint scores with: the configured default composition, unless ``model`` names a
        model other than the primary (then that model alone)."""
        svc = self.pick(model, field)
        if self.default_parts and svc is self.primary:
            return self.default_parts
        return svc

    async def compat_rewards(self, model: str | None, items: Sequence[ScoreItem], references: Sequence[str | None]
                             | None, truncate: bool | None, field: str) -> CompatResult:
        """Rewards for a compatibility endpoint; an item error is the request's 422 (these protocols have no
        per-item errors), naming the item and the part."""
        target = self.compat_parts(model)
        if isinstance(target, RewardService):
            scored = await target.score(items, truncate=truncate, field=field)
            return CompatResult([s.score.reward for s in scored], sum(s.score.num_tokens for s in scored), target,
                                {}, [s.score.truncated for s in scored])
        refs = list(references) if references is not None else [None] * len(items)
        done = await self.compose(target, items, refs, truncate, field)
        for i, c in enumerate(done):
            if c.errors:
                name, msg = next(iter(c.errors.items()))
                raise BadRequest(f"{msg if msg.startswith(field) else f'{field}[{i}]: {msg}'} (part {name!r} of "
                                 "the server's default_rewards)", field=f"{field}[{i}]")
        parts = {p.name: [float(c.components[p.name] or 0.0) for c in done] for p in target}
        return CompatResult([float(c.reward or 0.0) for c in done], sum(c.num_tokens for c in done), None, parts,
                            [c.truncated for c in done])

    def set_headers(self, response: Any, done: CompatResult) -> str:
        """The model and head headers of a compatibility response; returns the ``model`` it names (the model id,
        or ``composite`` for the server's default composition)."""
        if done.service is not None:
            set_score_headers(response, done.service)
            return done.service.rm.model_id
        model, version = self.label(self.default_parts)
        response.headers["x-rewardkit-model"] = model
        response.headers["x-rewardkit-head-version"] = version
        return model

    def label(self, parts: Sequence[Part]) -> tuple[str, str]:
        """(model, head_version) of a composed response: ``composite`` and each model's ``name:version``."""
        return "composite", ",".join(f"{p.name}:{p.service.head_version}" for p in parts if p.service is not None)


@dataclasses.dataclass
class CompatResult:
    rewards: list[float]
    num_tokens: int
    service: RewardService | None  # the one model that scored, or None for the default composition
    components: dict[str, list[float]]
    truncated: list[bool]


def response_text(item: ScoreItem) -> str:
    """What a component checks: the response (the last message; for pre-formatted text, from its response start)."""
    if item.response is not None:
        return item.response
    if item.messages:
        return str(item.messages[-1].get("content", ""))
    text = item.text or ""
    return text[item.response_start:] if item.response_start is not None else text
