"""RewardService: the engine every endpoint family calls. It validates items against the limits, formats them, queues
them on the scheduler, serves from the Redis score cache, feeds the drift monitor, and swaps published heads. What a
family answers (its response models) is built in that family's ``serving.py``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewardkit.core.abc import (
    AbcOptions,
    DenseResult,
    dense_rewards,
    resolve_layers,
    validate_spans,
)
from rewardkit.core.errors import InputError
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem
from rewardkit.core.loading import RewardModel
from rewardkit.core.prefix import prefix_key
from rewardkit.core.scoring import ItemScore, Scorer
from rewardkit.server import torch_thread
from rewardkit.server.drift import DriftMonitor
from rewardkit.server.errors import BadRequest, NotReady, Overloaded, PayloadTooLarge
from rewardkit.server.runs import RUN, RUN_HEADER, RUN_PREFIX, RunRegistry, check_prefix
from rewardkit.server.scheduler import DeadlineExceeded, QueueFull, Scheduler
from rewardkit.server.settings import Settings
from rewardkit.server.state import CachedScore, RedisState, cache_key

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
        self.abc_options = AbcOptions(layer=settings.abc_layer, num_layers=settings.abc_num_layers,
                                      renormalize=settings.abc_renormalize)
        self.formatter = Formatter(rm.tokenizer, max_length=settings.max_length, truncate=settings.truncate)
        self.padding_free = settings.padding_free == "on" or (settings.padding_free == "auto" and rm.device.type == "cpu")
        self.scorer = Scorer(rm, padding_side=settings.padding_side, prefix_sharing=settings.prefix_sharing,
                             padding_free=self.padding_free, prefix_cache_bytes=int(settings.prefix_cache_mb * 2**20))
        self.scheduler: Scheduler[ModelJob, ItemScore] = Scheduler(
            self._run_batch, max_batch_tokens=settings.max_batch_tokens, max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0, max_queue_items=settings.max_queue_items,
            on_batch=self._on_batch, max_padding=settings.max_padding_fraction, inline=settings.worker_mode == "inline",
            executor=torch_thread.EXECUTOR, run_weight=settings.run_weight,
            fair_batch_size=(settings.fair_batch_size if settings.fair_batch_size is not None
                             else 1 if self.padding_free else settings.max_batch_size),
            preemptible=self.padding_free,  # one forward per item: a batch can stop between parts for another run
            group_key=(lambda job: prefix_key(job.enc)) if settings.prefix_sharing else None)  # prompt mates batch together
        # operations (issue 7): drift monitor fed with every returned reward, optional Redis score cache
        def monitor() -> DriftMonitor:  # the global one and each run's: the same settings
            return DriftMonitor(window=settings.drift_window, reference_size=settings.drift_reference_size,
                                bins=settings.drift_bins, collapse_eps=settings.drift_collapse_eps,
                                min_samples=settings.drift_min_samples)

        self.drift: DriftMonitor | None = monitor() if settings.drift_enabled else None
        # per-run drift (rewardkit.server.runs): each run named by x-rewardkit-run / run_id against its own start
        self.runs: RunRegistry | None = RunRegistry(settings.max_runs, monitor) if settings.drift_enabled else None
        self.state: RedisState | None = None  # set by the app when settings.redis_url is given
        self._group_ns = uuid.uuid4().hex[:8]  # group ids stay unique when replicas' windows are merged
        self._request_seq = itertools.count()

    # -- model worker side (runs on the scheduler's thread) --------------------------------------------------
    def _run_batch(self, jobs: list[ModelJob]) -> list[ItemScore]:
        """One scheduler batch: the Scorer picks the path (dense rows, padding-free, prefix-shared, plain)."""
        dense = [j.dense for j in jobs]
        before = self.scorer.prefix.stats.snapshot()
        kv = self.scorer.kv
        kv_before = kv.stats.snapshot() if kv is not None else None
        out = self.scorer.score([j.enc for j in jobs], return_hidden=any(j.want_hidden for j in jobs), dense=dense,
                                abc_layers=resolve_layers(self.rm, self.abc_options) if any(dense) else None)
        after = self.scorer.prefix.stats
        if self.metrics is not None and after.items_shared > before.items_shared:
            self.metrics.observe_prefix_cache(after.items_shared - before.items_shared,
                                              after.prefix_tokens_saved - before.prefix_tokens_saved)
        if self.metrics is not None and kv is not None and kv_before is not None:
            self.metrics.observe_kv_cache(kv_before, kv.stats)
        return out

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
        return [self.encode_one(i, item, truncate, field) for i, item in enumerate(items)]

    def encode_one(self, i: int, item: ScoreItem, truncate: bool | None, field: str) -> EncodedItem:
        """Check item ``i`` against the per-item limits and format it (errors name ``{field}[i]``)."""
        limit = self.settings.max_chars_per_item
        chars = sum(len(s) for s in (item.prompt, item.response, item.text) if s) + sum(
            len(m.get("content", "")) for m in (item.messages or []))
        if chars > limit:
            raise PayloadTooLarge(f"{field}[{i}]: {chars} characters exceeds max_chars_per_item={limit}",
                                  field=f"{field}[{i}]")
        check_unicode(item, f"{field}[{i}]")
        try:
            return self.formatter.encode(item, i, truncate=truncate)
        except InputError as exc:
            if field != "items" and exc.field and exc.field.startswith("items"):
                exc.field = field + exc.field[len("items"):]
            raise

    async def score_encoded(self, encs: Sequence[EncodedItem], dense: bool = False,
                            want_hidden: bool = False) -> list[ItemScore]:
        """Queue encoded items and wait for their scores (in order)."""
        try:
            tag = RUN.get()  # fair share between runs (scheduler.py)
            futs = self.scheduler.submit([ModelJob(e, dense, want_hidden) for e in encs], [e.num_tokens for e in encs],
                                         timeout_s=self.settings.request_timeout_s,
                                         run=None if tag is None else tag.run_id)
        except QueueFull as exc:
            raise Overloaded(f"server overloaded: {exc}", retry_after=1.0) from exc
        try:
            return list(await asyncio.gather(*futs))
        except DeadlineExceeded as exc:  # overload, not a server bug: 429 so that clients back off and retry
            raise Overloaded(f"request waited in the queue past request_timeout_s="
                             f"{self.settings.request_timeout_s}", field="request_timeout_s", retry_after=1.0) from exc
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
        check_prefix(RUN.get(), RUN_PREFIX.get(), RUN_HEADER)
        encs = self.encode(items, truncate, field)
        return await self._score_observed(encs, t0)

    async def score_each(self, items: Sequence[ScoreItem], truncate: bool | None = None, field: str = "items"
                         ) -> list[ScoredItem | str]:
        """Like :meth:`score`, but an item this model cannot take (too long, bad text) gives its error message in
        its place and the others are scored (a composed request reports errors per item). Overload still raises:
        it is the whole request's."""
        t0 = time.monotonic()
        self.check_items_count(len(items), field)
        out: list[ScoredItem | str] = []
        good: list[EncodedItem] = []
        for i, item in enumerate(items):
            try:
                enc = self.encode_one(i, item, truncate, field)
            except (InputError, BadRequest, PayloadTooLarge) as exc:
                out.append(exc.message)
                continue
            good.append(enc)
            out.append("")
        scored = iter(await self._score_observed(good, t0) if good else [])
        return [next(scored) if o == "" else o for o in out]

    async def _score_observed(self, encs: Sequence[EncodedItem], t0: float) -> list[ScoredItem]:
        scores = await self.score_cached(encs)
        if self.metrics is not None:
            self.metrics.observe_scores(self.rm.model_id, self.rm.head_version, encs, scores, time.monotonic() - t0)
        self.observe_drift(encs, scores)
        return [ScoredItem(e, s) for e, s in zip(encs, scores, strict=True)]

    async def score_cached(self, encs: Sequence[EncodedItem]) -> list[ItemScore]:
        """`score_encoded` behind the Redis score cache (model id, head version, sha256 of text and ids).

        Without Redis, or while it is down, the cache is bypassed and every item is scored.
        """
        st = self.state
        if st is None or st.cache_ttl_s == 0 or not encs:
            return await self.score_encoded(encs)
        model_id, version = self.rm.model_id, self.head_version
        keys = [cache_key(e.text, e.input_ids) for e in encs]
        cached = await st.cache_get_many(model_id, version, keys)
        if cached is None:  # Redis down: bypass
            return await self.score_encoded(encs)
        miss = [i for i, c in enumerate(cached) if c is None]
        if self.metrics is not None:
            self.metrics.observe_score_cache(len(encs) - len(miss), len(miss))
        fresh = await self.score_encoded([encs[i] for i in miss]) if miss else []
        out: list[ItemScore | None] = [
            None if c is None else ItemScore(reward=c.reward, num_tokens=c.num_tokens, truncated=c.truncated,
                                             raw_reward=c.raw_reward) for c in cached]
        for i, s in zip(miss, fresh, strict=True):
            out[i] = s
        if miss and self.head_version == version:  # a head swapped mid-request must not file new scores as old
            await st.cache_put_many(model_id, version, [
                (keys[i], CachedScore(s.reward, s.raw_reward, s.num_tokens, s.truncated))
                for i, s in zip(miss, fresh, strict=True)])
        return [s for s in out if s is not None]

    def observe_drift(self, encs: Sequence[EncodedItem], scores: Sequence[ItemScore]) -> None:
        """Feed the drift monitor: reward, response length in tokens, and a group id per item.

        Items of one request that share a prompt (the formatted text before the response) form one group
        (a GRPO group); an item alone with its prompt gets no group.
        """
        if self.drift is None or not encs:
            return
        seq = next(self._request_seq)
        first: dict[str, int] = {}
        count: dict[str, int] = {}
        prefixes = [e.text[:e.response_start] for e in encs]
        for i, p in enumerate(prefixes):
            first.setdefault(p, i)
            count[p] = count.get(p, 0) + 1
        groups = [f"{self._group_ns}:{seq}:{first[p]}" if p and count[p] > 1 else None for p in prefixes]
        lengths = [len(e.response_token_indices()) for e in encs]
        rewards = [s.reward for s in scores]
        self.drift.observe(rewards, lengths, groups)
        tag = RUN.get()
        if tag is not None and self.runs is not None:
            self.runs.observe(tag, rewards, lengths, groups)

    def swap_scalar_head(self, model_id: str, version: str, weights: bytes) -> bool:
        """Install a published scalar head (safetensors with ``weight`` [and ``bias``], the head's shapes).

        The new ``nn.Linear`` replaces the old one by one attribute assignment, so a batch running on another
        thread uses either the old or the new head, never a mix. Returns False when the update is for another
        model, is the version already served, or is not a scalar head (an R2M head: the R2M updater's callback
        handles those).
        """
        import torch
        from safetensors.torch import load as load_safetensors

        if model_id != self.rm.model_id or version == self.head_version:
            return False
        tensors = load_safetensors(bytes(weights))
        weight = tensors.get("weight", tensors.get("score.weight"))
        bias = tensors.get("bias", tensors.get("score.bias"))
        old = self.rm.head
        if weight is None or tuple(weight.shape) != tuple(old.weight.shape):
            log.info("head update model=%s version=%s is not a scalar head of shape %s; left to other handlers",
                     model_id, version, tuple(old.weight.shape))
            return False
        new = torch.nn.Linear(old.in_features, old.out_features, bias=bias is not None, device=old.weight.device,
                              dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias.reshape(new.bias.shape))
        new.requires_grad_(False)
        attr = "score" if getattr(self.rm.model, "score", None) is old else "classifier"
        setattr(self.rm.model, attr, new)
        self.rm.head_version = version
        log.info("head swapped model=%s version=%s", model_id, version)
        return True

    @property
    def head_version(self) -> str:
        return str(self.rm.head_version)

    # -- ABC dense rewards (rewardkit.core.abc) ---------------------------------------------------------------
    # Layer choice and renormalisation are per server (they decide what the worker captures); beta is per request.
    abc_options: AbcOptions = AbcOptions()

    async def dense(self, items: Sequence[ScoreItem], beta: float, truncate: bool | None, field: str,
                     caller_spans: Sequence[Sequence[Sequence[int]] | None] | None = None
                     ) -> list[tuple[EncodedItem, ItemScore, DenseResult, list[tuple[int, int]] | None]]:
        """Encode, validate caller spans (before any model work), score with rows, build the dense vectors."""
        t0 = time.monotonic()
        check_prefix(RUN.get(), RUN_PREFIX.get(), RUN_HEADER)
        encs = self.encode(items, truncate, field)
        spans: list[list[tuple[int, int]] | None] = []
        for i, enc in enumerate(encs):
            raw = caller_spans[i] if caller_spans is not None else None
            spans.append(None if raw is None else validate_spans(
                enc.response, raw, f"{field}[{i}].response_token_spans"))
        try:
            opts = dataclasses.replace(self.abc_options, beta=beta)
        except InputError as exc:
            raise BadRequest(exc.message, field="beta") from exc
        scores = await self.score_encoded(encs, dense=True)
        if self.metrics is not None:
            self.metrics.observe_scores(self.rm.model_id, self.rm.head_version, encs, scores, time.monotonic() - t0)
            self.metrics.observe_abc_entropy([s.attention_entropy for s in scores if s.attention_entropy is not None])
        self.observe_drift(encs, scores)
        return [(e, s, dense_rewards(e, s, opts), sp) for e, s, sp in zip(encs, scores, spans, strict=True)]

    # -- end ABC ------------------------------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Names a request may send as ``model``: the model id, the ``--model`` path (as given and resolved),
        ``--served-model-name`` aliases, and ``default``. verl and vLLM clients send the path they were configured
        with; OpenAI-style clients send the id from ``/v1/models``."""
        names = [self.rm.model_id, *self.settings.served_model_name]
        if self.settings.model:
            import os

            m = self.settings.model
            names += [m, m.rstrip("/"), os.path.abspath(m), os.path.basename(m.rstrip("/"))]
        return list(dict.fromkeys(n for n in names if n))

    def check_model(self, model: str | None, field: str = "model") -> None:
        if model is None or model in ("default", "") or model in self.model_names() or model.rstrip("/") in self.model_names():
            return
        names = ", ".join(repr(n) for n in [self.rm.model_id, *self.settings.served_model_name, "default"])
        raise BadRequest(f"{field}: this server serves {self.rm.model_id!r}, not {model!r}; send one of {names}, "
                         "omit the field, or start the server with --served-model-name", field=field)


def to_score_item(d: Any) -> ScoreItem:
    """Protocol item -> core ScoreItem."""
    msgs = None if d.messages is None else [{"role": m.role, "content": m.content} for m in d.messages]
    return ScoreItem(prompt=d.prompt, response=d.response, messages=msgs, text=d.text)


def ensure(cond: bool, message: str, field: str) -> None:
    if not cond:
        raise BadRequest(message, field=field)


def check_unicode(item: ScoreItem, field: str) -> None:
    """Refuse text the tokenizer cannot take: JSON's ``\\ud800`` escapes decode to lone surrogates, which are not
    Unicode scalar values (the Rust tokenizer raises on them, which used to answer 500)."""
    texts = [item.prompt, item.response, item.text, *(m.get("content") for m in (item.messages or []))]
    for s in texts:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise BadRequest(f"{field}: invalid Unicode (lone surrogate U+{ord(s[exc.start]):04X} at character "
                                 f"{exc.start}); send valid UTF-8 text", field=field) from None


def set_score_headers(response: Any, service: RewardService) -> None:
    """Say which model and head scored a response (every scoring endpoint, compatibility ones included), so a
    trainer can log which R2M head produced a batch without parsing the body."""
    response.headers["x-rewardkit-model"] = service.rm.model_id
    response.headers["x-rewardkit-head-version"] = service.head_version


def encode_vector(values: np.ndarray, encoding_format: str) -> str | list[float]:
    arr = np.asarray(values, dtype="<f4")
    if encoding_format == "float":
        return [float(x) for x in arr]
    return base64.b64encode(arr.tobytes()).decode("ascii")
