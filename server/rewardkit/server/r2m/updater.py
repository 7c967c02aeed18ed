"""The online updater: groups feedback by prompt, trains a copy of the head with GREBT, publishes a new version.

It runs on its own thread and never touches the model worker: samples arrive with the RM's hidden state at the
reward token already computed (see `feedback.FeedbackSample`). One update = every group completed by one batch
of entries (K members, or a flush); it applies to all of them or to none:

1. copy the active head, GREBT steps on the copy (the live head is never mutated);
2. a non-finite loss or gradient in any step: nothing is applied, the groups are dropped and counted as rejected;
3. otherwise write the new version to disk (atomically, with the applied group keys in the same file),
4. swap the active reference (one assignment: scoring that already read the old reference finishes on it),
5. acknowledge the entries (Redis: XACK), 6. publish the weights to replicas (optional).

A crash between 3 and 5 re-delivers the entries after a restart; their keys are in the store's applied set, so
they are acknowledged without being applied again.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardkit.core.r2m import R2MBatch, R2MHead, make_optimizer, mix_weight, r2m_update_step
from rewardkit.server.r2m.feedback import (
    Entry,
    FeedbackQueue,
    FeedbackSample,
)
from rewardkit.server.r2m.store import HeadStore, parse_version, version_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveHead:
    """An immutable snapshot: read it once per request and use it for the whole request."""

    number: int
    head: R2MHead
    round: int

    @property
    def version(self) -> str:
        return version_name(self.number)


@dataclass
class _Group:
    members: dict[int, tuple[str, FeedbackSample]] = field(default_factory=dict)
    size: int = 0


def collate(samples: Sequence[FeedbackSample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack samples: h_last (B, D_rm) float32, hidden (B, S_max, D_p) float32 zero-padded, mask (B, S_max) bool."""
    s_max = max(s.hidden.shape[0] for s in samples)
    d_p = samples[0].hidden.shape[1]
    hidden = np.zeros((len(samples), s_max, d_p), dtype=np.float32)  # (B, S, D_p)
    mask = np.zeros((len(samples), s_max), dtype=bool)  # (B, S)
    for i, s in enumerate(samples):
        n = s.hidden.shape[0]
        hidden[i, :n] = s.hidden
        mask[i, :n] = True
    h_last = np.stack([np.asarray(s.h_last, dtype=np.float32) for s in samples])  # (B, D_rm)
    return torch.from_numpy(h_last), torch.from_numpy(hidden), torch.from_numpy(mask)


class R2MUpdater:
    """Holds the active head and (optionally) runs the update loop on its own thread.

    Args:
        store: versioned heads on disk (the initial head must already be there).
        queue: where feedback entries come from.
        steps_per_update: GREBT steps per update.
        publish: called with (version, safetensors path) after a version is durable (e.g. Redis publication).
    """

    def __init__(self, store: HeadStore, queue: FeedbackQueue, *,
                 steps_per_update: int = 1, publish: Callable[[str, Path], None] | None = None,
                 cfg_override: Callable[[R2MHead], None] | None = None, pause: float = 0.0) -> None:
        self.store = store
        self.queue = queue
        self.steps_per_update = steps_per_update
        self.pause = pause
        self.publish = publish
        self._cfg_override = cfg_override
        number = store.active_number()
        if number is None:
            raise RuntimeError("the head store is empty: save the initial head first")
        self._active = self._load(number)
        self._applied: set[str] = store.applied_keys()
        self._pending: OrderedDict[str, _Group] = OrderedDict()
        self._unacked: list[str] = []
        self._update_lock = threading.Lock()  # one update or activation at a time
        self._opt_state: dict[str, Any] | None = None
        self._opt_base: int | None = None
        self._flush_results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.updates_applied = 0
        self.groups_applied = 0
        self.groups_rejected = 0
        self.duplicates = 0
        self.last_error: str | None = None
        self.last_stats: dict[str, float] = {}
        self.busy_s = 0.0

    # -- the active head ---------------------------------------------------------------------------------------
    @property
    def active(self) -> ActiveHead:
        return self._active

    def _load(self, number: int) -> ActiveHead:
        head, meta = self.store.load(number)
        if self._cfg_override is not None:
            self._cfg_override(head)
        head.eval().requires_grad_(False)
        return ActiveHead(number=number, head=head, round=int(meta.get("round", 0)))

    def activate(self, version: str) -> ActiveHead:
        """Roll back (or forward) to a stored version; KeyError if there is none. Waits for an update in flight."""
        number = parse_version(version)
        if number is None or number not in self.store.numbers():
            raise KeyError(version)
        with self._update_lock:
            loaded = self._load(number)
            self.store.set_active(number)  # the durable record first: if it cannot be written, nothing changes
            self._active = loaded
            self._opt_state = None  # optimiser moments belong to the lineage we left
        log.info("r2m head activated version=%s", version)
        return self._active

    def install(self, version: str) -> bool:
        """Adopt a version another replica published (already written into our store). False if unknown/current."""
        number = parse_version(version)
        if number is None or number not in self.store.numbers() or number == self._active.number:
            return False
        with self._update_lock:
            self._active = self._load(number)
            self._applied.update(self.store.info(number).applied)
            self._opt_state = None
        log.info("r2m head installed from a replica version=%s", version)
        return True

    # -- queue side --------------------------------------------------------------------------------------------
    def pending_groups(self) -> int:
        return len(self._pending)

    def pending_frames(self) -> int:
        return sum(len(g.members) for g in list(self._pending.values()))

    def pending_bytes(self) -> int:
        """Hidden-state bytes held by incomplete groups."""
        return sum(s.hidden.nbytes + np.asarray(s.h_last).nbytes for g in list(self._pending.values())
                   for _, s in g.members.values())

    def flush_result(self, flush_id: str) -> dict[str, Any] | None:
        return self._flush_results.get(flush_id)

    def process(self, entries: Sequence[Entry]) -> list[str]:
        """Take entries in order; apply every group they complete (one update). Returns the applied group keys."""
        ready: list[str] = []
        acks: list[str] = []
        flushes: list[tuple[str, list[dict[str, Any]]]] = []
        for e in entries:
            if e.sample is not None:
                s = e.sample
                key = s.key
                if key in self._applied:  # re-delivered after a crash, or a client retry of an applied group
                    self.duplicates += 1
                    acks.append(e.id)
                    continue
                g = self._pending.setdefault(key, _Group(size=s.group_size))
                if s.index in g.members:
                    self.duplicates += 1
                    acks.append(e.id)
                    continue
                g.members[s.index] = (e.id, s)
                if len(g.members) >= g.size and key not in ready:
                    ready.append(key)
            elif e.flush_keys or e.flush_id:
                rejected: list[dict[str, Any]] = []
                for key in (e.flush_keys or list(self._pending)):  # no keys: every pending group
                    fg = self._pending.get(key)
                    if fg is None or key in ready:
                        continue
                    if len(fg.members) >= 2:
                        ready.append(key)
                    else:  # GREBT needs a pair: drop the group (whole), say so
                        del self._pending[key]
                        acks.extend(eid for eid, _ in fg.members.values())
                        self.groups_rejected += 1
                        rejected.append({"group": key, "size": len(fg.members)})
                acks.append(e.id)
                if e.flush_id:
                    flushes.append((e.flush_id, rejected))
            else:
                acks.append(e.id)
        error: str | None = None
        try:
            applied = self._apply(ready) if ready else []
        except UpdateFailed as exc:  # nothing applied, nothing acknowledged: the groups wait in _pending
            applied, error = [], str(exc)
        self._ack(acks)
        for fid, rejected in flushes:
            self._flush_results[fid] = {"applied": applied, "rejected": rejected, "version": self._active.version,
                                        "error": error}
            while len(self._flush_results) > 1000:
                self._flush_results.popitem(last=False)
        return applied

    def _ack(self, ids: Sequence[str]) -> None:
        self._unacked.extend(ids)
        if not self._unacked:
            return
        try:
            self.queue.ack(self._unacked)
            self._unacked = []
        except Exception as exc:  # noqa: BLE001 - retried on the next loop; the applied set prevents double use
            self.last_error = f"ack failed: {exc}"
            log.warning("r2m ack failed (will retry): %s", exc)

    # -- one update --------------------------------------------------------------------------------------------
    def _apply(self, keys: list[str]) -> list[str]:
        groups = [(k, self._pending.pop(k)) for k in keys]
        samples = [s for _, g in groups for _, (_, s) in sorted(g.members.items())]
        ids = [eid for _, g in groups for eid, _ in g.members.values()]
        group_ids = [k for k, g in groups for _ in g.members]
        t0 = time.perf_counter()
        h_last, hidden, mask = collate(samples)
        rnd = max(s.round for s in samples)
        with self._update_lock:
            base = self._active
            cfg = base.head.cfg
            w = mix_weight(rnd, cfg.total_rounds, cfg.omega)
            head = copy.deepcopy(base.head).requires_grad_(True)
            opt = make_optimizer(head)
            if self._opt_state is not None and self._opt_base == base.number:
                opt.load_state_dict(self._opt_state)
            offset = torch.tensor([float(x.ll_term) for x in samples], dtype=torch.float32)
            batch = R2MBatch(h_last, hidden, mask, group_ids, offset if bool(offset.any()) else None)
            stats: dict[str, float] = {}
            ok = True
            for _ in range(self.steps_per_update):
                t_step = time.perf_counter()
                stats = r2m_update_step(head, opt, batch, w=w)
                if not stats.get("applied"):
                    ok = False
                    break
                if self.pause > 0:  # leave the cores to scoring for a while (small CPU hosts)
                    time.sleep(self.pause * (time.perf_counter() - t_step))
            if not ok:
                self.groups_rejected += len(keys)
                self.last_error = f"update of {len(keys)} groups not applied: non-finite loss or gradient"
                log.warning("r2m update rejected groups=%d stats=%s", len(keys), stats)
                self._ack(ids)
                return []
            stats["w"] = w
            try:
                number = max(self.store.numbers()) + 1
                self.store.save(head, number, round=rnd, applied=keys, parent=base.version, stats=stats)  # durable
            except Exception as exc:  # noqa: BLE001 - e.g. the state directory became read-only or full
                for k, g in reversed(groups):  # keep the feedback: back at the front, not acknowledged
                    self._pending[k] = g
                    self._pending.move_to_end(k, last=False)
                self.last_error = f"head store not writable: {type(exc).__name__}: {exc}"
                log.error("r2m update not applied (feedback kept, %d groups): %s", len(keys), self.last_error)
                raise UpdateFailed(self.last_error) from exc
            head.eval().requires_grad_(False)
            self._active = ActiveHead(number=number, head=head, round=rnd)  # the atomic swap
            self._opt_state = copy.deepcopy(opt.state_dict())
            self._opt_base = number
            self._applied.update(keys)
        self._ack(ids)
        self.updates_applied += 1
        self.groups_applied += len(keys)
        self.last_stats = stats
        self.busy_s += time.perf_counter() - t0
        log.info("r2m update version=%s groups=%d samples=%d round=%d w=%.3f loss=%.4f", version_name(number),
                 len(keys), len(samples), rnd, w, stats.get("loss", float("nan")))
        if self.publish is not None:
            try:
                self.publish(version_name(number), self.store.path(number))
            except Exception as exc:  # noqa: BLE001 - replicas catch up later; the head is durable here
                log.warning("r2m publish of %s failed: %s", version_name(number), exc)
        return keys

    # -- the thread --------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="r2m-updater", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop after the update in flight (if any) is durable."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._ack([])

    def _run(self) -> None:
        # (torch.set_num_threads here would not stay in this thread: it changes the whole process, measured)
        backoff = 0.1
        while not self._stop.is_set():
            try:
                entries = self.queue.get(timeout=0.2)
                if entries or self._unacked:
                    self.process(entries)
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - keep the loop alive (Redis down, ...); say why
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("r2m updater loop error; retrying in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


class UpdateFailed(RuntimeError):
    """An update could not be made durable; its groups are kept pending and nothing was acknowledged."""


def new_flush_id() -> str:
    return uuid.uuid4().hex
