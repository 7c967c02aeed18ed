"""R2MService: parses RKF1 streams incrementally, computes H_last on the model worker, queues feedback, scores.

Frame headers (see rewardkit.core.wire for the framing; docs/r2m.md "Serving" for the whole contract):

- required by the wire: ``group_id``, ``index``, ``round``, ``dtype``, ``shape`` = [S, D_p];
- the item the RM scores, one of: ``item`` (``{"prompt", "response"}``, ``{"messages": [...]}`` or
  ``{"text": ...}``), top-level ``prompt`` + ``response``, ``reward_text``, or ``rm_item_key`` (the ``item_key``
  that ``/v1/r2m/rewards`` returned for the same item: the server reuses the RM hidden state it kept, no forward);
- optional ``group_size`` (>= 2; default ``settings.r2m_group_size``): the group is complete at that many members.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import torch

from rewardkit.core.errors import InputError
from rewardkit.core.formatting import ScoreItem
from rewardkit.core.forward import normalise
from rewardkit.core.r2m import mix_weight
from rewardkit.core.wire import Frame, FrameDecoder, FrameError, reduce_positions
from rewardkit.server import torch_thread
from rewardkit.server.errors import BadRequest, NotFound, NotReady, Overloaded, PayloadTooLarge
from rewardkit.server.r2m.feedback import (
    FeedbackQueue,
    FeedbackSample,
)
from rewardkit.server.r2m.protocol import (
    FeedbackResponse,
    HeadInfo,
    HeadList,
    R2MRewardResponse,
    R2MRewardResult,
    R2MStatus,
)
from rewardkit.server.r2m.store import parse_version
from rewardkit.server.r2m.updater import ActiveHead, R2MUpdater, collate, new_flush_id
from rewardkit.server.settings import Settings
from rewardkit.server.state import cache_key

log = logging.getLogger(__name__)

_CHUNK_FRAMES = 16  # frames per model-worker call during ingestion (bounds memory: 16 x max frame)


class StreamError(BadRequest):
    """A bad frame mid-stream; the message says how many earlier frames were kept."""


def frame_item(frame: Frame) -> ScoreItem | None:
    """The scoring item a frame names, or None if it names none (it may carry ``rm_item_key`` instead)."""
    h = frame.header
    field = f"frame {frame.frame_index}: header.item"
    item = h.get("item")
    if item is not None:
        msgs = item.get("messages")
        if msgs is not None:
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise FrameError("header.item.messages must be a non-empty list of {role, content} strings",
                                 frame.frame_index, "header.item.messages")
            return ScoreItem(messages=[{"role": m["role"], "content": m["content"]} for m in msgs])
        p, r, t = item.get("prompt"), item.get("response"), item.get("text")
        if isinstance(t, str):
            return ScoreItem(text=t)
        if isinstance(p, str) and isinstance(r, str):
            return ScoreItem(prompt=p, response=r)
        raise InputError(f"{field} needs messages, prompt+response, or text (strings)", "header.item")
    if isinstance(h.get("prompt"), str) and isinstance(h.get("response"), str):
        return ScoreItem(prompt=h["prompt"], response=h["response"])
    if isinstance(h.get("reward_text"), str):
        return ScoreItem(text=h["reward_text"])
    return None


class R2MService:
    """The work behind ``/v1/r2m/*``. One per server process, built once the model is loaded."""

    def __init__(self, settings: Settings, reward_service: Any, updater: R2MUpdater,
                 queue: FeedbackQueue, d_policy: int) -> None:
        self.settings = settings
        self.svc = reward_service
        self.updater = updater
        self.queue = queue
        self.d_policy = d_policy
        # item_key -> (H_last (D_rm,), RM reward, the RM's fixed LL term ll_weight * ll)
        self._h_cache: OrderedDict[str, tuple[np.ndarray, float, float]] = OrderedDict()
        self._h_cache_max = 65536
        self.frames_ingested = 0
        self.bytes_ingested = 0

    @property
    def model_id(self) -> str:
        return str(self.svc.rm.model_id)

    def decoder(self) -> FrameDecoder:
        s = self.settings
        return FrameDecoder(max_payload_bytes=s.r2m_max_frame_bytes, max_frames=s.r2m_max_frames_per_stream,
                            expected_dim=self.d_policy)

    # -- shared: frames -> (H_last, policy hidden) -------------------------------------------------------------
    def _check_frame(self, f: Frame) -> None:
        gs = f.header.get("group_size")
        cap = self.settings.r2m_max_group_size
        if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or not 2 <= gs <= cap):
            raise FrameError(f"header.group_size must be an integer within [2, {cap}] (GREBT needs a pair; "
                             f"r2m_max_group_size={cap}), got {gs!r}", f.frame_index, "header.group_size")
        key = f.header.get("rm_item_key")
        if key is not None and not isinstance(key, str):
            raise FrameError("header.rm_item_key must be a string", f.frame_index, "header.rm_item_key")
        if frame_item(f) is None and key is None:
            raise FrameError("the frame names no item: send header.item (or prompt+response, reward_text) or "
                             "header.rm_item_key", f.frame_index, "header.item")

    async def _h_last(self, frames: Sequence[Frame]) -> tuple[list[np.ndarray], list[float], list[str], list[float]]:
        """H_last per frame (from the cache by key, else one model-worker call for the rest), RM rewards, keys, and
        the RM's LL term per frame (``ll_weight`` x the response's mean log-likelihood; 0 for a model without one):
        the part of the RM's reward that does not come from the head, so the R2M reward adds it too."""
        out: list[np.ndarray | None] = [None] * len(frames)
        rm_rewards: list[float] = [0.0] * len(frames)
        ll_terms: list[float] = [0.0] * len(frames)
        keys: list[str] = [""] * len(frames)
        todo: list[int] = []
        items: list[ScoreItem] = []
        for i, f in enumerate(frames):
            ref = f.header.get("rm_item_key")
            item = frame_item(f)
            if item is None:
                hit = self._h_cache.get(ref) if isinstance(ref, str) else None
                if hit is None:
                    raise FrameError(f"unknown rm_item_key {ref!r} (expired or never scored here): send the item",
                                     f.frame_index, "header.rm_item_key")
                (out[i], rm_rewards[i], ll_terms[i]), keys[i] = hit, str(ref)
                continue
            todo.append(i)
            items.append(item)
        if items:
            try:
                encs = self.svc.encode(items, None, "frames")
            except InputError as exc:  # name the frame, not the position in this chunk
                raise BadRequest(f"{exc.message} (frames counted within this chunk; chunk starts at frame "
                                 f"{frames[0].frame_index})", exc.field) from exc
            to_score: list[int] = []
            for j, (i, enc) in enumerate(zip(todo, encs, strict=True)):
                keys[i] = cache_key(enc.text, enc.input_ids)
                hit = self._h_cache.get(keys[i])
                if hit is not None:
                    out[i], rm_rewards[i], ll_terms[i] = hit
                else:
                    to_score.append(j)
            if to_score:
                scores = await self.svc.score_encoded([encs[j] for j in to_score], want_hidden=True)
                for j, sc in zip(to_score, scores, strict=True):
                    i = todo[j]
                    assert sc.hidden is not None
                    out[i] = sc.hidden.float().numpy()
                    rm_rewards[i] = float(sc.reward)
                    ll_terms[i] = float(self.svc.rm.meta.ll_weight) * float(sc.ll) if sc.ll is not None else 0.0
                    self._remember(keys[i], out[i], rm_rewards[i], ll_terms[i])
        result = [h for h in out if h is not None]
        assert len(result) == len(frames)
        return result, rm_rewards, keys, ll_terms

    def _remember(self, key: str, h: np.ndarray | None, rm_reward: float, ll_term: float = 0.0) -> None:
        if h is None:
            return
        self._h_cache[key] = (h, rm_reward, ll_term)
        self._h_cache.move_to_end(key)
        while len(self._h_cache) > self._h_cache_max:
            self._h_cache.popitem(last=False)

    def _policy_hidden(self, f: Frame) -> np.ndarray:
        a = f.array
        if a.shape[0] > self.settings.r2m_max_positions:
            a = reduce_positions(a, self.settings.r2m_max_positions)
        return a

    # -- feedback ----------------------------------------------------------------------------------------------
    async def ingest(self, stream: AsyncIterator[bytes], flush: bool = False) -> FeedbackResponse:
        """Parse, enrich and queue a feedback stream. Frames before a bad one are kept; the error names the frame."""
        if not flush:  # a flush must always get through: it is how a client drains what is pending
            self._check_pending(0, 0, 0)
        dec = self.decoder()
        limit = self.settings.r2m_max_stream_bytes
        nbytes, accepted = 0, 0
        batch: list[Frame] = []
        keys: list[str] = []
        error: Exception | None = None
        async for chunk in stream:
            nbytes += len(chunk)
            if error is not None:  # drain what the client still sends so that it reads our answer
                if nbytes > limit:
                    break
                continue
            if nbytes > limit:
                error = PayloadTooLarge(f"stream exceeds r2m_max_stream_bytes={limit}", "body")
                continue
            try:
                batch.extend(dec.feed(chunk))
            except FrameError as exc:
                batch.extend(exc.decoded)
                error = exc
            if len(batch) >= _CHUNK_FRAMES or (error is not None and batch):
                n, err = await self._accept(batch, keys)
                accepted += n
                batch = []
                error = error if err is None else err
        if error is None:
            try:
                dec.close()
            except FrameError as exc:
                error = exc
        if batch:
            n, err = await self._accept(batch, keys)
            accepted += n
            error = error or err
        self.frames_ingested += accepted
        self.bytes_ingested += nbytes
        if error is not None:
            self._raise_kept(error, accepted)
        resp = FeedbackResponse(accepted_frames=accepted, bytes=nbytes, queue=self.queue.kind,
                                head_version=self.updater.active.version)
        if flush:  # a stream with no frame flushes every pending group
            await self._flush(sorted(set(keys)), resp)
        return resp

    def _check_pending(self, frames: int, nbytes: int, groups: int) -> None:
        """Refuse (429) feedback that would take the incomplete groups past any bound: groups, frames or bytes."""
        s, u = self.settings, self.updater
        for what, have, limit in (("incomplete groups", u.pending_groups() + groups, s.r2m_max_pending_groups),
                                  ("pending frames", u.pending_frames() + frames, s.r2m_max_pending_frames),
                                  ("pending bytes", u.pending_bytes() + nbytes, s.r2m_max_pending_bytes)):
            if have > limit or (frames == 0 and have >= limit):
                name = {"incomplete groups": "r2m_max_pending_groups", "pending frames": "r2m_max_pending_frames",
                        "pending bytes": "r2m_max_pending_bytes"}[what]
                raise Overloaded(f"{have} {what} would be held ({name}={limit}): complete the groups or flush them "
                                 "(POST /v1/r2m/feedback?flush=true always works)", field=name, retry_after=1.0)

    async def _accept(self, frames: list[Frame], keys: list[str]) -> tuple[int, Exception | None]:
        """Queue the frames up to the first bad one. Returns (frames queued, the error or None)."""
        good: list[Frame] = []
        error: Exception | None = None
        for f in frames:
            try:
                self._check_frame(f)
            except InputError as exc:
                error = exc
                break
            good.append(f)
        while good:
            try:
                h_last, _, _, ll_terms = await self._h_last(good)
                break
            except (InputError, BadRequest) as exc:  # find the bad frame: keep the ones before it
                if len(good) == 1:
                    error = error or exc
                    return 0, _name_frame(exc, good[0].frame_index)
                bad = await self._first_bad(good)
                error = _name_frame(exc, good[bad].frame_index)
                good = good[:bad]
        if not good:
            return 0, error
        default_k = self.settings.r2m_group_size
        samples = [FeedbackSample(group_id=f.group_id, index=f.index, round=f.round,
                                  group_size=int(f.header.get("group_size", default_k)), h_last=h,
                                  hidden=self._policy_hidden(f), ll_term=ll)
                   for f, h, ll in zip(good, h_last, ll_terms, strict=True)]
        try:
            self._check_pending(len(samples), sum(x.hidden.nbytes + x.h_last.nbytes for x in samples),
                                len({x.key for x in samples}))
        except Overloaded as exc:
            return 0, exc
        try:
            await self.queue.put(samples)
        except Exception as exc:  # noqa: BLE001 - the queue (Redis) is down: these frames were not accepted
            log.warning("r2m feedback queue put failed: %s", exc)
            raise NotReady(f"feedback queue unavailable ({type(exc).__name__}); nothing from frame "
                           f"{good[0].frame_index} on was accepted", retry_after=2.0) from exc
        keys.extend(s.key for s in samples)
        return len(samples), error

    async def _first_bad(self, frames: list[Frame]) -> int:
        for i, f in enumerate(frames):
            try:
                await self._h_last([f])
            except (InputError, BadRequest):
                return i
        return len(frames)

    def _raise_kept(self, error: Exception, accepted: int) -> None:
        kept = f"; the {accepted} earlier good frames were accepted" if accepted else "; no frame was accepted"
        if isinstance(error, FrameError):
            raise StreamError(error.message + kept, error.field)
        if isinstance(error, (BadRequest, PayloadTooLarge, Overloaded)):
            error.message += kept
            raise error
        if isinstance(error, InputError):
            raise StreamError(error.message + kept, error.field)
        raise error

    async def _flush(self, keys: list[str], resp: FeedbackResponse) -> None:
        """Ask the updater to complete these groups now; wait for it (if it runs here) and report."""
        fid = new_flush_id()
        await self.queue.put_flush(keys, fid)
        resp.flushed = True
        if not self.updater.running:
            return
        deadline = time.monotonic() + 60.0
        while (res := self.updater.flush_result(fid)) is None:
            if time.monotonic() > deadline:
                raise NotReady("flush not confirmed within 60 s (the updater is busy or failing: GET "
                               "/v1/r2m/status says why); the feedback is kept pending", retry_after=5.0)
            await asyncio.sleep(0.005)
        if res.get("error"):  # nothing was applied and the feedback is kept: say so with a 5xx, never a quiet 200
            raise NotReady(f"flush not applied: {res['error']}; the pending feedback is kept (this request's "
                           f"{resp.accepted_frames} frames included); retry the flush once the server's state "
                           "directory is writable", retry_after=5.0)
        resp.applied_groups = list(res["applied"])
        resp.head_version = str(res["version"])
        if res["rejected"]:
            r = res["rejected"][0]
            raise BadRequest(f"group {r['group']!r} has {r['size']} member at flush; GREBT needs at least 2 rollouts "
                             f"of one prompt. It was dropped; {len(resp.applied_groups)} other groups were applied "
                             f"(head {resp.head_version}) and {resp.accepted_frames} frames accepted", "group_id")

    # -- rewards -----------------------------------------------------------------------------------------------
    async def rewards(self, stream: AsyncIterator[bytes]) -> R2MRewardResponse:
        """Score every frame with the active head (one snapshot for the whole request). All or nothing."""
        active = self.updater.active  # scoring finishes on this version even if an update lands meanwhile
        dec = self.decoder()
        frames: list[Frame] = []
        nbytes = held = 0
        limit = self.settings.r2m_max_stream_bytes
        max_items, max_held = self.settings.max_items_per_request, self.settings.r2m_max_rewards_bytes
        async for chunk in stream:  # every limit is checked as frames arrive, never after buffering the stream
            nbytes += len(chunk)
            if nbytes > limit:
                raise PayloadTooLarge(f"stream exceeds r2m_max_stream_bytes={limit}", "body")
            for f in dec.feed(chunk):
                if len(frames) >= max_items:
                    raise PayloadTooLarge(f"frames: more than max_items_per_request={max_items} frames in one "
                                          "request (refused at the first one past it)", "frames")
                self._check_frame(f)
                f.array = self._policy_hidden(f)
                held += f.array.nbytes
                if held > max_held:
                    raise PayloadTooLarge(f"frames: {held} bytes of hidden states after pooling exceed "
                                          f"r2m_max_rewards_bytes={max_held} (at frame {f.frame_index}); send fewer "
                                          "frames per request", "frames")
                frames.append(f)
        dec.close()
        if not frames:
            raise BadRequest("the stream holds no frame", "body")
        h_last, rm_rewards, keys, ll_terms = await self._h_last(frames)
        raw = await torch_thread.run(self._score_head, active, frames, h_last, ll_terms)
        bad = [i for i, v in enumerate(raw) if not np.isfinite(v)]
        if bad:  # never answer 200 with a null reward
            f = frames[bad[0]]
            raise BadRequest(f"frame {f.frame_index}: the R2M head's reward is not finite for these hidden states "
                             f"(largest |value| {float(np.abs(f.array).max()):.3g}); send the policy's last-layer "
                             "states as they are, not scaled", f"frames[{f.frame_index}]")
        results = []
        for i, f in enumerate(frames):
            cfg = active.head.cfg
            w = mix_weight(f.round, cfg.total_rounds, cfg.omega)
            results.append(R2MRewardResult(frame=f.frame_index, group_id=f.group_id, index=f.index,
                                           reward=float(normalise(self.svc.rm, raw[i])), rm_reward=rm_rewards[i], w=w,
                                           item_key=keys[i]))
        return R2MRewardResponse(model=self.model_id, head_version=active.version,
                                 rewards=[r.reward for r in results], results=results)

    @staticmethod
    @torch.inference_mode()
    def _score_head(active: ActiveHead, frames: Sequence[Frame], h_last: Sequence[np.ndarray],
                    ll_terms: Sequence[float]) -> list[float]:
        """Raw R2M rewards (the head's, plus the RM's LL term), batched per distinct w (frames of one round share it)."""
        cfg = active.head.cfg
        ws = [mix_weight(f.round, cfg.total_rounds, cfg.omega) for f in frames]
        out = [0.0] * len(frames)
        for w in sorted(set(ws)):
            idx = [i for i, x in enumerate(ws) if x == w]
            samples = [FeedbackSample(frames[i].group_id, frames[i].index, frames[i].round, 2, h_last[i],
                                      frames[i].array) for i in idx]
            hl, hid, mask = collate(samples)
            r = active.head(hl, hid, mask, w=w).float().tolist()  # (B,)
            for i, v in zip(idx, r, strict=True):
                out[i] = v + ll_terms[i]
        return out


def _name_frame(exc: Exception, frame_index: int) -> Exception:
    if isinstance(exc, FrameError):
        return exc
    msg = getattr(exc, "message", str(exc))
    field = getattr(exc, "field", None)
    return FrameError(msg, frame_index, field)


# -- what the head routes answer ----------------------------------------------------------------------------

def head_list(r2m: R2MService) -> HeadList:
    active = r2m.updater.active.version
    heads = [HeadInfo(version=h.version, round=h.round, created_at=h.created_at, groups=len(h.applied),
                      parent=h.parent, loss=h.loss, active=h.version == active) for h in r2m.updater.store.stored()]
    return HeadList(model=r2m.model_id, active=active, heads=heads)


async def activate(r2m: R2MService, version: str) -> HeadList:
    """Make a stored version the active head (rollback). Unknown version: 404."""
    if parse_version(version) is None:
        raise NotFound(f"unknown head version {version!r} (versions look like 'r2m-000003')", "version")
    try:
        await torch_thread.run(r2m.updater.activate, version)
    except KeyError:
        raise NotFound(f"unknown head version {version!r}; GET /v1/r2m/heads lists them", "version") from None
    except OSError as exc:  # the record could not be written: nothing changed (the served head included)
        raise NotReady(f"rollback not recorded ({type(exc).__name__}: {exc}); the active head is unchanged",
                       retry_after=5.0) from exc
    return await asyncio.to_thread(head_list, r2m)


def status(r2m: R2MService) -> R2MStatus:
    u = r2m.updater
    return R2MStatus(model=r2m.model_id, active=u.active.version, queue=r2m.queue.kind, updater_running=u.running,
                     pending_groups=u.pending_groups(), pending_frames=u.pending_frames(),
                     updates_applied=u.updates_applied, groups_applied=u.groups_applied,
                     groups_rejected=u.groups_rejected, last_error=u.last_error)
