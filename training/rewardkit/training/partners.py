"""Seeded partner draws for comparisons across examples: RRM's augmentation and ``rewardkit eval --relevance``.

Torch-free and import-free, so evaluation can draw partners without importing a trainer.
"""

from __future__ import annotations

import random

__all__ = ["draw_partners"]


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A seeded shuffle of range(n) with its fixed points removed by swapping each with its right neighbour.

    Swapping a fixed point ``i`` with position ``i+1`` (wrapping to 0) puts a different value at ``i`` and ``i`` at
    ``i+1``; positions already checked stay non-fixed, so one pass suffices and the result is still a permutation.
    """
    perm = list(range(n))
    rng.shuffle(perm)
    for i in range(n):
        if perm[i] == i:
            nxt = (i + 1) % n
            perm[i], perm[nxt] = perm[nxt], perm[i]
    return perm


def draw_partners(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Partners ``j[i]``, ``k[i]`` from two independent seeded shuffles, never ``i`` itself. Needs ``n >= 2``.

    Example::

        >>> j, k = draw_partners(5, seed=0)
        >>> all(j[i] != i and k[i] != i for i in range(5))
        True
    """
    if n < 2:
        raise ValueError(f"RRM augmentation needs at least 2 training pairs to draw partners from, got {n}")
    return (_derangement(n, random.Random(f"rewardkit-rrm:{seed}:j")),
            _derangement(n, random.Random(f"rewardkit-rrm:{seed}:k")))
