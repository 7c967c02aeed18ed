"""RewardService: validates items against the limits, formats them, queues them on the scheduler, and builds
responses. The HTTP routes are thin wrappers around it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from rewardkit.core.errors import InputError
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.loading import RewardModel
from rewardkit.core.scoring import ItemScore, Scorer
from rewardkit.server.errors import BadRequest, NotReady, Overloaded, PayloadTooLarge, ServerError
from rewardkit.server.scheduler import DeadlineExceeded, QueueFull, Scheduler
from rewardkit.server.settings import Settings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelJob:
    """What the model worker receives for one item."""

    enc: EncodedItem
    dense: bool = False
    want_hidden: bool = False


@dataclasses.dataclass
class ScoredItem:
    enc: EncodedItem
    score: ItemScore


class RewardService:
    """Owns the model, the formatter, the scorer and the scheduler of one server process."""

    def __init__(self, settings: Settings, rm: RewardModel, metrics: Any | None = None) -> None:
        self.settings = settings
        self.rm = rm
        self.metrics = metrics
        self.formatter = Formatter(rm.tokenizer, max_length=settings.max_length, truncate=settings.truncate)
        self.scorer = Scorer(rm, padding_side=settings.padding_side)
        self.padding_free = settings.padding_free == "on" or (settings.padding_free == "auto" and rm.device.type == "cpu")
        self.scheduler: Scheduler[ModelJob, ItemScore] = Scheduler(
            self._run_batch, max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0, max_queue_items=settings.max_queue_items,
            on_batch=self._on_batch, max_padding=settings.max_padding_fraction, inline=settings.worker_mode == "inline" or (
                settings.worker_mode == "auto" and rm.device.type == "cpu"))

    # -- model worker side (runs on the scheduler's thread) --------------------------------------------------
    def _run_batch(self, jobs: list[ModelJob]) -> list[ItemScore]:
        hidden = any(j.want_hidden for j in jobs)
        if self.padding_free and not self.settings.prefix_sharing:
            # CPU: a padded batch needs an explicit attention mask, which sends SDPA down its slow masked path
            # (measured: batch 4 is ~25-35% slower per token than single items). One unpadded forward per item
            # keeps the causal kernel; cross-request batching still amortises the queueing and HTTP work.
            return [s for j in jobs for s in self.scorer.score_batch([j.enc], return_hidden=hidden)]
        return self.scorer.score_batch([j.enc for j in jobs], return_hidden=hidden)

    def _on_batch(self, stats: Any) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch_stats(stats)

    # -- request side ----------------------------------------------------------------------------------------
    def check_items_count(self, n: int, field: str = "items") -> None:
        if n > self.settings.max_items_per_request:
            raise PayloadTooLarge(f"{field}: {n} items exceeds max_items_per_request={self.settings.max_items_per_request}",
                                  field=field)

    def encode(self, items: Sequence[ScoreItem], truncate: bool | None = None, field: str = "items") -> list[EncodedItem]:
        self.check_items_count(len(items), field)
        limit = self.settings.max_chars_per_item
        out: list[EncodedItem] = []
        for i, item in enumerate(items):
            chars = sum(len(s) for s in (item.prompt, item.response, item.text) if s) + sum(
                len(m.get("content", "")) for m in (item.messages or []))
            if chars > limit:
                raise PayloadTooLarge(f"{field}[{i}]: {chars} characters exceeds max_chars_per_item={limit}",
                                      field=f"{field}[{i}]")
            try:
                out.append(self.formatter.encode(item, i, truncate=truncate))
            except InputError as exc:
                if field != "items" and exc.field and exc.field.startswith("items"):
                    exc.field = field + exc.field[len("items"):]
                raise
        return out

    async def score_encoded(self, encs: Sequence[EncodedItem], dense: bool = False,
                            want_hidden: bool = False) -> list[ItemScore]:
        """Queue encoded items and wait for their scores (in order)."""
        try:
            futs = self.scheduler.submit([ModelJob(e, dense, want_hidden) for e in encs], [e.num_tokens for e in encs],
                                         timeout_s=self.settings.request_timeout_s)
        except QueueFull as exc:
            raise Overloaded(f"server overloaded: {exc}", retry_after=1.0) from exc
        try:
            return list(await asyncio.gather(*futs))
        except DeadlineExceeded as exc:
            raise ServerError(f"request timed out in the queue after request_timeout_s="
                              f"{self.settings.request_timeout_s}") from exc
        except QueueFull as exc:
            raise NotReady(str(exc), retry_after=5.0) from exc
        except InputError:
            raise
        except asyncio.CancelledError:
            for f in futs:
                f.cancel()
            raise

    async def score(self, items: Sequence[ScoreItem], truncate: bool | None = None, field: str = "items"
                    ) -> list[ScoredItem]:
        t0 = time.monotonic()
        encs = self.encode(items, truncate, field)
        scores = await self.score_encoded(encs)
        if self.metrics is not None:
            self.metrics.observe_scores(self.rm.model_id, self.rm.head_version, encs, scores, time.monotonic() - t0)
        return [ScoredItem(e, s) for e, s in zip(encs, scores, strict=True)]

    @property
    def head_version(self) -> str:
        return str(self.rm.head_version)

    async def score_dense(self, req: Any, items: Sequence[ScoreItem]) -> list[Any]:
        """ABC dense rewards (see rewardkit.core.abc)."""
        raise BadRequest("dense rewards are not available on this server yet", field="dense")

    async def pooling_token_classify(self, items: Sequence[ScoreItem], beta: float) -> tuple[list[Any], int]:
        """vLLM ``token_classify``: per-token ABC rewards over each item's tokens."""
        raise BadRequest("token_classify (dense rewards) is not available on this server yet", field="task")

    def check_model(self, model: str | None, field: str = "model") -> None:
        if model is not None and model not in (self.rm.model_id, "default", ""):
            raise BadRequest(f"{field}: this server serves {self.rm.model_id!r}, not {model!r}", field=field)


def to_score_item(d: Any) -> ScoreItem:
    """Protocol item -> core ScoreItem."""
    msgs = None if d.messages is None else [{"role": m.role, "content": m.content} for m in d.messages]
    return ScoreItem(prompt=d.prompt, response=d.response, messages=msgs, text=d.text)


def ensure(cond: bool, message: str, field: str) -> None:
    if not cond:
        raise BadRequest(message, field=field)
