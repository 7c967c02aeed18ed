"""Id-RM's targets in the student's token positions: the teacher's reward distribution, response rows and masses
mapped onto the student's tokens by characters, the shuffled and uniform controls, and targets given in the data.

Split out of :mod:`rewardkit.training.idrm` (which re-exports every name here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewardkit.core.formatting import EncodedItem

__all__ = ["StudentTarget", "char_overlap", "control_target", "data_target", "project_char_mass",
           "student_row_targets", "student_targets"]


def project_char_mass(char_mass: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mass of each token from the characters it covers, (n,), renormalised to sum 1 (all zeros if no mass lands).

    A character covered by several tokens (overlapping offsets) is split evenly among them.
    """
    n_chars = len(char_mass)
    cover = np.zeros(n_chars + 1, dtype=np.float64)
    spans = [(max(0, s), min(n_chars, e)) for s, e in offsets]
    for s, e in spans:
        if e > s:
            cover[s] += 1
            cover[e] -= 1
    cover = np.cumsum(cover)[:n_chars]  # (L,) tokens covering each character
    per_char = np.divide(char_mass, cover, out=np.zeros(n_chars), where=cover > 0)
    csum = np.concatenate([[0.0], np.cumsum(per_char)])
    out = np.array([csum[e] - csum[s] if e > s else 0.0 for s, e in spans], dtype=np.float64)
    total = out.sum()
    return out / total if total > 0 else out


def student_targets(item: EncodedItem, char_mass: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(student response token indices, the teacher distribution over them) for one encoded text.

    ``char_mass`` is over the characters of ``item.response``; student offsets are shifted into that frame.
    """
    keep = item.response_token_indices()
    rel = [(item.offsets[i][0] - item.response_start, item.offsets[i][1] - item.response_start) for i in keep]
    if len(char_mass) != item.response_end - item.response_start:
        raise ValueError(f"char_mass has {len(char_mass)} characters, the response has "
                         f"{item.response_end - item.response_start}")
    return keep, project_char_mass(char_mass, rel)


@dataclasses.dataclass
class StudentTarget:
    """The teacher's targets for one encoded text, in the student's token positions.

    ``idx`` (m,): the response token indices (sorted); ``dist`` (m,): the reward token's target distribution over
    them; ``rows`` (m, m): row j is the teacher's attention of response token j over the response tokens (not yet
    cut to the causal keys ``<= j``: :func:`row_kl_and_mass` does that); ``mass`` (m,): the teacher's share of token
    j's attention on the response so far, among prompt + response so far; ``reward_mass``: the same for the reward
    token; ``valid`` (m,): tokens usable as queries (they cover a teacher token, and their causal row has mass).
    """

    idx: list[int]
    dist: np.ndarray
    rows: np.ndarray
    mass: np.ndarray
    reward_mass: float
    valid: np.ndarray

    @classmethod
    def empty(cls) -> StudentTarget:
        return cls([], np.zeros(0), np.zeros((0, 0)), np.zeros(0), 0.0, np.zeros(0, dtype=bool))


def char_overlap(student: Sequence[tuple[int, int]], teacher: Sequence[tuple[int, int]] | np.ndarray,
                 length: int) -> np.ndarray:
    """(m, n): characters of teacher token t covered by student token s (a character covered by several student
    tokens is shared evenly among them, as in :func:`project_char_mass`)."""
    cover = np.zeros(length + 1)
    spans = [(max(0, a), min(length, b)) for a, b in student]
    for a, b in spans:
        if b > a:
            cover[a] += 1
            cover[b] -= 1
    cover = np.cumsum(cover)[:length]
    owner = np.full(length, -1, dtype=np.int64)  # the teacher token of each character (WordPiece spans are disjoint)
    for t, (a, b) in enumerate(np.asarray(teacher).reshape(-1, 2).tolist()):
        owner[max(0, a):min(length, b)] = t
    n = len(np.asarray(teacher).reshape(-1, 2))
    out = np.zeros((len(spans), n))
    for j, (a, b) in enumerate(spans):
        if b > a:
            o, c = owner[a:b], cover[a:b]
            keep = o >= 0
            np.add.at(out[j], o[keep], 1.0 / c[keep])
    return out


def student_row_targets(item: EncodedItem, char_mass: np.ndarray, maps: dict[str, np.ndarray]) -> StudentTarget:
    """The teacher's reward distribution (:func:`student_targets`) plus its response rows and masses, mapped onto
    ``item``'s tokens by characters: a student query's row is the overlap-weighted mean of the teacher rows of the
    teacher tokens it covers; a teacher key's mass is spread over its characters and collected by the student tokens
    covering them. The causal cut (keys up to the query) is made in the student's positions."""
    idx, dist = student_targets(item, char_mass)
    m = len(idx)
    length = item.response_end - item.response_start
    t_off = maps["offsets"].reshape(-1, 2)
    rel = [(item.offsets[i][0] - item.response_start, item.offsets[i][1] - item.response_start) for i in idx]
    ov = char_overlap(rel, t_off, length)  # (m, n)
    t_len = np.maximum(1, t_off[:, 1] - t_off[:, 0]).astype(np.float64)  # (n,)
    q_sum = ov.sum(1)
    qmap = np.divide(ov, q_sum[:, None], out=np.zeros_like(ov), where=q_sum[:, None] > 0)  # (m, n) rows sum to 1
    kmap = (ov / t_len[None, :]).T  # (n, m): teacher key mass -> student keys
    rows = qmap @ maps["rows"].reshape(len(t_off), len(t_off)) @ kmap if len(t_off) else np.zeros((m, m))
    prompt = qmap @ maps["prompt"] if len(t_off) else np.zeros(m)
    causal = np.tril(rows).sum(1)  # (m,) mass on the response so far
    total = causal + prompt
    mass = np.divide(causal, total, out=np.zeros(m), where=total > 0)
    valid = (q_sum > 0) & (causal > 0)
    return StudentTarget(idx, dist, rows, mass, float(maps["reward_mass"].reshape(-1)[0]), valid)


def control_target(t: StudentTarget, control: str, rng: np.random.Generator) -> StudentTarget:
    """The controls of :class:`IdRMConfig.target_control`: ``shuffled`` permutes the response's tokens (the reward
    distribution, both axes of the rows, the masses and the query mask) with one seeded permutation, so the targets
    keep their values and lose their places; ``uniform`` makes the distribution and every row uniform and keeps the
    teacher's mass targets."""
    m = len(t.idx)
    if control == "teacher" or m == 0:
        return t
    if control == "shuffled":
        pi = rng.permutation(m)
        rows = t.rows[pi][:, pi]
        return dataclasses.replace(t, dist=t.dist[pi], rows=rows, mass=t.mass[pi],
                                   valid=t.valid[pi] & (np.tril(rows).sum(1) > 0))
    if control == "uniform":
        return dataclasses.replace(t, dist=np.full(m, 1.0 / m), rows=np.ones((m, m)))
    raise ValueError(f"target_control: unknown control {control!r}")


def data_target(item: EncodedItem, spans: Any, where: str) -> StudentTarget:
    """A reward-token target from the data: ``spans`` = [[start, end, weight], ...] character spans of the response
    (weights >= 0), spread over their characters and collected by the student's tokens. None or no mass: no target
    (the text trains on BT alone). Response rows and the mass term need a teacher, so they stay off."""
    if spans is None:
        return StudentTarget.empty()
    n = item.response_end - item.response_start
    char_mass = np.zeros(n)
    if not isinstance(spans, list):
        raise ValueError(f"{where}: expected a list of [start, end, weight] spans, got {type(spans).__name__}")
    for k, sp in enumerate(spans):
        if not (isinstance(sp, list | tuple) and len(sp) == 3):
            raise ValueError(f"{where}[{k}]: expected [start, end, weight], got {sp!r}")
        a, b, w = int(sp[0]), int(sp[1]), float(sp[2])
        if not (0 <= a < b <= n) or not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"{where}[{k}]: span [{a}, {b}) must lie in the response's {n} characters and its "
                             f"weight be finite and >= 0, got {sp!r}")
        char_mass[a:b] += w / (b - a)
    idx, dist = student_targets(item, char_mass)
    m = len(idx)
    return StudentTarget(idx, dist, np.zeros((m, m)), np.zeros(m), 0.0, np.zeros(m, dtype=bool))
