"""Head versions on disk: one safetensors file per version (atomic), an atomic pointer for rollbacks.

Layout under ``<state_dir>/r2m/<model-slug>/``::

    r2m-000000.safetensors   the initial head (phi = the RM's scalar head), round 0
    r2m-000007.safetensors   version 7; its header metadata ``extra`` records the update that made it:
                             {"applied": [group keys], "parent": "r2m-000006", "stats": {...}, "created_at": t}
    active.json              {"version": "r2m-000004", "max_version": 7}: written by a rollback only

The applied group keys live *inside* the head file, so "this group was applied" and "this head contains it" become
durable in one ``os.replace``: after a crash, a feedback entry whose group key is in ``applied_keys()`` was applied
(and is only acknowledged again), one whose key is not was not (and is applied once).

The active version at start-up is the newest file, unless ``active.json`` names another one *and* no newer
version was written since that rollback (its ``max_version`` is still the newest).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardkit.core.checkpoint import atomic_write_bytes
from rewardkit.core.errors import ModelLoadError
from rewardkit.core.r2m import R2MHead, load_head, read_head_metadata, save_head

log = logging.getLogger(__name__)

_NAME = re.compile(r"^r2m-(\d{6,12})\.safetensors$")  # bounded: int() of 5,000 digits raises


def version_name(n: int) -> str:
    """``7 -> "r2m-000007"``."""
    return f"r2m-{n:06d}"


def parse_version(name: str) -> int | None:
    """``"r2m-000007" -> 7``; anything else -> None."""
    m = re.fullmatch(r"r2m-(\d{6,12})", name)
    return int(m.group(1)) if m else None


def model_slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[:120] or "model"


@dataclass(frozen=True)
class StoredHead:
    version: str
    number: int
    round: int
    created_at: float
    applied: tuple[str, ...]
    parent: str | None
    loss: float | None


def _atomic_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(obj).encode())


class HeadStore:
    """Versioned R2M heads of one model in one directory."""

    def __init__(self, root: Path, model_id: str, keep: int = 0) -> None:
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.dir = Path(root) / "r2m" / model_slug(model_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def path(self, number: int) -> Path:
        return self.dir / f"{version_name(number)}.safetensors"

    def numbers(self) -> list[int]:
        out = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def info(self, number: int) -> StoredHead:
        meta = read_head_metadata(self.path(number))
        extra = meta.get("extra") or {}
        stats = extra.get("stats") or {}
        return StoredHead(version=version_name(number), number=number, round=int(meta.get("round", 0)),
                          created_at=float(extra.get("created_at", 0.0)), applied=tuple(extra.get("applied", ())),
                          parent=extra.get("parent"), loss=stats.get("loss"))

    def stored(self) -> list[StoredHead]:
        out = []
        for n in self.numbers():
            try:
                out.append(self.info(n))
            except ModelLoadError as exc:  # a foreign or damaged file: skip it, say so
                log.warning("r2m store: skipping %s: %s", self.path(n), exc)
        return out

    def applied_keys(self) -> set[str]:
        """Every group key recorded as applied by any stored version."""
        keys: set[str] = set()
        for h in self.stored():
            keys.update(h.applied)
        return keys

    def save(self, head: R2MHead, number: int, *, round: int, applied: list[str], parent: str | None,
             stats: dict[str, float] | None = None) -> StoredHead:
        """Write version ``number`` atomically (refuses to overwrite an existing version)."""
        path = self.path(number)
        if path.exists():
            raise FileExistsError(f"R2M head version {version_name(number)} already exists at {path}")
        extra: dict[str, Any] = {"applied": list(applied), "parent": parent, "stats": stats or {}, "created_at": time.time()}
        save_head(head, path, version=number, round=round, extra=extra)
        self._prune()
        return self.info(number)

    def load(self, number: int) -> tuple[R2MHead, dict[str, Any]]:
        return load_head(self.path(number))

    def active_number(self) -> int | None:
        """The version to serve at start-up (see the module docstring); None when the store is empty."""
        nums = self.numbers()
        if not nums:
            return None
        ptr = self.dir / "active.json"
        if ptr.exists():
            try:
                data = json.loads(ptr.read_text())
                if int(data["max_version"]) == nums[-1] and int(data["version"]) in nums:
                    return int(data["version"])
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("r2m store: ignoring unreadable %s: %s", ptr, exc)
        return nums[-1]

    def set_active(self, number: int) -> None:
        """Record a rollback (durable across restarts until a newer version is written)."""
        nums = self.numbers()
        if number not in nums:
            raise KeyError(version_name(number))
        _atomic_json(self.dir / "active.json", {"version": number, "max_version": nums[-1]})

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        nums = self.numbers()
        active = self.active_number()
        for n in nums[:-self.keep]:
            if n not in (0, active):  # the initial head and the active one always stay
                self.path(n).unlink(missing_ok=True)

    def write_bytes(self, number: int, data: bytes) -> bool:
        """Store a head published by another replica (validated before it becomes visible). False if present."""
        path = self.path(number)
        if path.exists():
            return False
        def check(tmp: str) -> None:
            meta = read_head_metadata(tmp)
            if int(meta.get("version", -1)) != number:
                raise ModelLoadError(f"published head says version {meta.get('version')}, expected {number}")

        atomic_write_bytes(path, data, check=check)
        return True
