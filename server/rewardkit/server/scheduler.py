"""Async dynamic batcher: items from concurrent requests -> token-budget batches -> one model worker thread.

- Every item of a request is queued at once (or the whole request is refused with 429: nothing half-accepted).
- The batcher waits at most ``max_wait_s`` after the first pending item to let a batch fill, then picks the oldest
  item and grows the batch around it in length order (so similar lengths share a batch and padding stays small)
  within ``max_batch_tokens`` padded tokens and ``max_batch_size`` items.
- One worker thread owns the device; the event loop never runs the model.
- Items whose request was cancelled (client gone) or whose deadline passed are dropped before the model.
- If a batch raises, its items are retried one by one so a failing item fails only its own request.
- Fair between runs (start-time fair queueing): each item gets a virtual start tag, ``max(V, its run's last finish)``,
  and costs its tokens divided by its run's weight; batches start from the smallest tag instead of the oldest item.
  A run that floods the queue pushes only its own tags ahead, so another run's next item is served in the next
  batch. With one run (or none named) tags follow arrival order: plain FIFO, as before.
  While two or more runs are active (waiting, or submitted or answered within 1 s), a batch is the
  ``fair_batch_size`` smallest tags (a short batch: where a batch's time grows with its items, as on CPU, a run's
  next item waits at most one short batch, not a full one). With ``preemptible`` (the CPU's padding-free path,
  where a batch is one forward per item anyway), a batch formed while one named run was alone runs in parts of
  that size, and a run that shows up meanwhile is served after the current part, not after the whole batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")  # what the model worker receives per item
R = TypeVar("R")  # what it returns per item


ACTIVE_S = 1.0  # a run that submitted or was answered this recently is still active (fair share)


class QueueFull(Exception):
    """The bounded queue cannot take the request."""


class DeadlineExceeded(Exception):
    """The item waited longer than its request's deadline."""


@dataclasses.dataclass(eq=False)
class Job(Generic[P]):
    payload: P
    num_tokens: int
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float
    key: Hashable | None = None  # prefix-group key (see Scheduler's group_key)
    tag: float = 0.0  # virtual start time (fair queueing between runs): batches start from the smallest
    run: str | None = None  # the training run it scores for


def _parts(batch: list[Job[P]], size: int) -> list[list[Job[P]]]:
    """Split a batch into parts of about ``size`` items, keeping the items of one prefix group in one part (the
    Scorer shares their prompt within a batch)."""
    groups: dict[Hashable, list[Job[P]]] = {}
    units: list[list[Job[P]]] = []
    for job in batch:
        if job.key is None:
            units.append([job])
        elif job.key in groups:
            groups[job.key].append(job)
        else:
            groups[job.key] = [job]
            units.append(groups[job.key])
    parts: list[list[Job[P]]] = []
    for unit in units:
        if parts and len(parts[-1]) + len(unit) <= size:
            parts[-1].extend(unit)
        else:
            parts.append(list(unit))
    return parts


@dataclasses.dataclass
class BatchStats:
    size: int
    tokens: int
    padded_tokens: int
    queue_wait_s: list[float]
    seconds: float

    @property
    def padding_fraction(self) -> float:
        """Share of the batch's padded positions (size x longest item) that are padding."""
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


def select_batch(lengths: Sequence[int], ages: Sequence[float], max_tokens: int, max_size: int,
                 max_padding: float = 1.0, keys: Sequence[Hashable | None] | None = None) -> list[int]:
    """Pick indices for one batch: the oldest item plus neighbours in length order, under the padded-token budget.

    ``ages``: enqueue times (smaller = older). ``max_padding``: the largest padded fraction a batch may reach (an
    item that would push it higher waits for a better-matched batch). ``keys``: a prefix-group key per item (None:
    none); pending items sharing a key with a chosen one join the batch too, past the padding cap but within the
    token and size budgets (a GRPO group scored together runs its prompt once). Returns indices into ``lengths``;
    always at least one.
    """
    if keys is not None:
        return _with_prefix_mates(select_batch(lengths, ages, max_tokens, max_size, max_padding), lengths, ages,
                                  keys, max_tokens, max_size)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], ages[i]))
    oldest = min(range(len(lengths)), key=lambda i: ages[i])
    pos = order.index(oldest)
    lo = hi = pos
    width = lengths[oldest]
    real = lengths[oldest]
    while hi - lo + 1 < max_size:
        n = hi - lo + 1
        cand: list[tuple[int, int, int]] = []  # (padding waste, new lo, new hi)
        if lo > 0 and width * (n + 1) <= max_tokens:
            ln = lengths[order[lo - 1]]
            if 1 - (real + ln) / (width * (n + 1)) <= max_padding:
                cand.append((width - ln, lo - 1, hi))
        if hi + 1 < len(order):
            w2 = lengths[order[hi + 1]]
            if w2 * (n + 1) <= max_tokens and 1 - (real + w2) / (w2 * (n + 1)) <= max_padding:
                cand.append(((w2 - width) * n, lo, hi + 1))
        if not cand:
            break
        _, lo, hi = min(cand)
        width = max(width, lengths[order[hi]])
        real = sum(lengths[order[k]] for k in range(lo, hi + 1))
    return [order[k] for k in range(lo, hi + 1)]


def _with_prefix_mates(idx: list[int], lengths: Sequence[int], ages: Sequence[float],
                       keys: Sequence[Hashable | None], max_tokens: int, max_size: int) -> list[int]:
    """Add the pending items that share a prefix key with the chosen ones (the oldest's group first, then by age)."""
    chosen = set(idx)
    oldest = min(idx, key=lambda i: ages[i])
    wanted = [keys[i] for i in sorted(idx, key=lambda i: ages[i]) if keys[i] is not None]
    rank = {k: r for r, k in reversed(list(enumerate(wanted)))}  # the oldest item's key ranks first
    mates = sorted((j for j in range(len(lengths)) if j not in chosen and keys[j] in rank),
                   key=lambda j: (rank[keys[j]], ages[j]))
    width = max(lengths[i] for i in idx)
    out = list(idx)
    for j in mates:
        w = max(width, lengths[j])
        if len(out) >= max_size or w * (len(out) + 1) > max_tokens:
            continue
        out.append(j)
        width = w
    assert oldest in out
    return out


class Scheduler(Generic[P, R]):
    """Batches jobs across requests and runs ``batch_fn`` on a single worker thread."""

    def __init__(self, batch_fn: Callable[[list[P]], list[R]], *, max_batch_tokens: int, max_batch_size: int,
                 max_wait_s: float, max_queue_items: int,
                 on_batch: Callable[[BatchStats], None] | None = None, inline: bool = False,
                 max_padding: float = 1.0, group_key: Callable[[P], Hashable | None] | None = None,
                 executor: ThreadPoolExecutor | None = None,
                 run_weight: Callable[[str | None], float] | None = None, fair_batch_size: int = 0,
                 preemptible: bool = False) -> None:
        self._batch_fn = batch_fn
        self._run_weight = run_weight  # a run's share of the model (default 1 each); see the module docstring
        self._vtime = 0.0  # virtual time: the start tag of the last batch's first item
        self._finish: dict[str | None, float] = {}  # each run's last virtual finish time (pruned once <= _vtime)
        self.fair_batch_size = fair_batch_size  # batch cap while several runs are active (0: no cap)
        self.preemptible = preemptible  # a batch may stop between parts when a second run shows up (see _loop)
        self._seen: dict[str | None, float] = {}  # run -> when it last submitted or was answered (pruned)
        self._group_key = group_key  # prefix-group key of a payload (rewardkit.core.prefix): mates share a batch
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self._on_batch = on_batch
        # inline: run the model on the event-loop thread (CPU: no GIL hand-offs between loop and worker; requests
        # that arrive during a forward wait in the socket and form the next batch). Thread: a dedicated worker
        # thread (GPU: kernels release the GIL, so HTTP parsing overlaps the forward).
        self.inline = inline
        self.max_padding = max_padding
        self._pending: list[Job[P]] = []
        self._wakeup = asyncio.Event()
        # the worker thread: a shared one (the server's torch thread, rewardkit.server.torch_thread) or its own
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="rewardkit-model")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.in_flight = 0  # items handed to the worker and not yet answered

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        """The batching loop is running (started, not stopped, not crashed)."""
        return self._task is not None and not self._task.done() and not self._closing

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="rewardkit-batcher")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop after everything queued has been answered (or ``drain_timeout`` passed)."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=drain_timeout)
            except TimeoutError:
                self._task.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(QueueFull("server shutting down"))
        self._pending.clear()
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=False)

    def submit(self, payloads: Sequence[P], lengths: Sequence[int], timeout_s: float,
               run: str | None = None) -> list[asyncio.Future[R]]:
        """Queue all items of one request atomically; raise QueueFull if they do not fit.

        ``run``: the training run the request scores for (fair share between runs; None = the unnamed run)."""
        if self._closing:
            raise QueueFull("server is shutting down")
        if len(self._pending) + len(payloads) > self.max_queue_items:
            raise QueueFull(f"queue holds {len(self._pending)} items; max_queue_items={self.max_queue_items}")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self._seen[run] = now
        weight = 1.0 if self._run_weight is None else self._run_weight(run)
        tag = max(self._vtime, self._finish.get(run, 0.0))
        futs: list[asyncio.Future[R]] = []
        for p, n in zip(payloads, lengths, strict=True):
            fut: asyncio.Future[R] = loop.create_future()
            key = None if self._group_key is None else self._group_key(p)
            self._pending.append(Job(p, n, fut, now, now + timeout_s, key, tag, run))
            tag += max(n, 1) / weight
            futs.append(fut)
        self._finish[run] = tag
        self._wakeup.set()
        return futs

    def _drop_dead(self) -> None:
        now = time.monotonic()
        alive: list[Job[P]] = []
        for job in self._pending:
            if job.future.done():  # cancelled: the client went away
                continue
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("request deadline passed while queued"))
                continue
            alive.append(job)
        self._pending = alive

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            oldest = min(j.enqueued for j in self._pending)
            wait = oldest + self.max_wait_s - time.monotonic()
            if wait > 0 and not self._closing and self._budget_left():
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=wait)
                except TimeoutError:
                    pass
                continue
            self._drop_dead()
            if not self._pending:
                continue
            idx = self._contended_batch()
            if idx is None:
                keys = None if self._group_key is None else [j.key for j in self._pending]
                idx = select_batch([j.num_tokens for j in self._pending], [j.tag for j in self._pending],
                                   self.max_batch_tokens, self.max_batch_size, self.max_padding, keys)
            chosen = set(idx)
            batch = [self._pending[i] for i in sorted(idx, key=lambda i: self._pending[i].num_tokens)]
            self._pending = [j for k, j in enumerate(self._pending) if k not in chosen]
            self._advance(min(j.tag for j in batch))
            # a batch formed with one run active runs in parts of fair_batch_size items (prefix mates together) when
            # ``preemptible``: once a second run shows up, the rest goes back to the queue (tags kept) and the next
            # batch is a fair one, so a run that joins waits one part, not a whole batch of the other run's items
            # (named runs only: unnamed traffic, one tenant as before, keeps its whole batches)
            parts = (_parts(batch, self.fair_batch_size)
                     if self.preemptible and 0 < self.fair_batch_size < len(batch)
                     and any(j.run is not None for j in batch) else [batch])
            for k, part in enumerate(parts):
                self.in_flight += len(part)
                try:
                    await self._run(loop, part)
                finally:
                    self.in_flight -= len(part)
                if k + 1 < len(parts) and self.active_runs() >= 2:
                    self._pending.extend(j for rest in parts[k + 1:] for j in rest)
                    break

    def active_runs(self) -> int:
        """Runs with items waiting, or that submitted or were answered within the last second: a run whose requests
        were just answered is between requests, not gone (a closed-loop trainer sends its next one a round trip
        later)."""
        horizon = time.monotonic() - ACTIVE_S
        return len({r for r, t in self._seen.items() if t >= horizon} | {j.run for j in self._pending})

    def _contended_batch(self) -> list[int] | None:
        """While several runs are active: the smallest tags, at most ``fair_batch_size`` items within the token
        budget (None otherwise: the usual length-sorted batch)."""
        cap = min(self.fair_batch_size, self.max_batch_size)
        if cap <= 0 or self.active_runs() < 2:
            return None
        out: list[int] = []
        width = 0
        for i in sorted(range(len(self._pending)), key=lambda k: self._pending[k].tag):
            w = max(width, self._pending[i].num_tokens)
            if out and (len(out) >= cap or w * (len(out) + 1) > self.max_batch_tokens):
                break
            out.append(i)
            width = w
        return out

    def _advance(self, tag: float) -> None:
        """Move virtual time to the tag a batch starts from (called once the batch left the queue). Forget the
        finish tags it has passed, and those of runs with nothing waiting that were not seen within ``ACTIVE_S``:
        the bookkeeping holds only runs that are waiting or recent, whatever run ids clients send."""
        self._vtime = max(self._vtime, tag)
        horizon = time.monotonic() - ACTIVE_S  # run ids come from clients: keep only the recent ones
        self._seen = {r: t for r, t in self._seen.items() if t >= horizon}
        waiting = {j.run for j in self._pending}
        self._finish = {r: f for r, f in self._finish.items()
                        if f > self._vtime and (r in waiting or r in self._seen)}

    def _budget_left(self) -> bool:
        """True while the pending items do not yet fill one batch (worth waiting for more)."""
        if len(self._pending) >= self.max_batch_size:
            return False
        return sum(j.num_tokens for j in self._pending) < self.max_batch_tokens

    async def _call(self, loop: asyncio.AbstractEventLoop, payloads: list[P]) -> list[R]:
        if self.inline:
            out = self._batch_fn(payloads)
            await asyncio.sleep(0)  # one pass of the event loop: requests that arrived meanwhile are read in
            return out
        return await loop.run_in_executor(self._executor, self._batch_fn, payloads)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job[P]]) -> None:
        t0 = time.monotonic()
        try:
            results = await self._call(loop, [j.payload for j in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch_fn returned {len(results)} results for {len(batch)} items")
            pairs: list[tuple[Job[P], R | BaseException]] = list(zip(batch, results, strict=True))
        except Exception as exc:  # isolate the failing item: retry one by one
            if len(batch) == 1:
                pairs = [(batch[0], exc)]
            else:
                log.warning("batch of %d failed (%s); retrying items one by one", len(batch), exc)
                pairs = []
                for job in batch:
                    try:
                        one = await self._call(loop, [job.payload])
                        pairs.append((job, one[0]))
                    except Exception as one_exc:
                        pairs.append((job, one_exc))
        answered = time.monotonic()
        seconds = answered - t0
        for job, res in pairs:
            self._seen[job.run] = answered
            if job.future.done():
                continue
            if isinstance(res, BaseException):
                job.future.set_exception(res)
            else:
                job.future.set_result(res)
        if self._on_batch is not None:
            width = max(j.num_tokens for j in batch)
            try:
                self._on_batch(BatchStats(size=len(batch), tokens=sum(j.num_tokens for j in batch),
                                          padded_tokens=width * len(batch),
                                          queue_wait_s=[t0 - j.enqueued for j in batch], seconds=seconds))
            except Exception:  # metrics must never break serving
                log.exception("on_batch hook failed")
