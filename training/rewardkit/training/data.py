"""Preference data: load pairs from JSONL, Parquet or in-memory rows in TRL's preference format.

Accepted row shapes (the same as TRL's ``RewardTrainer``):

* standard, explicit prompt: ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational, explicit prompt: ``prompt``, ``chosen``, ``rejected`` are message lists
  ``[{"role": ..., "content": ...}, ...]`` (``chosen``/``rejected`` hold the assistant turn(s))
* implicit prompt: no ``prompt`` column; ``chosen`` and ``rejected`` are full conversations (or full
  texts) that share a prefix. The shared prefix becomes the prompt. For message lists the prefix is
  the longest run of identical messages; for plain strings it is the longest common character prefix,
  moved back to a word boundary (TRL's rule cuts mid-word, e.g. ``"... is 8" + "5"``).

An optional ``margin`` (float) is kept; every other column is kept in ``PreferencePair.meta``.

Malformed rows raise :class:`DataError` naming the row and the field. Rows that are well formed but
useless (an empty response, chosen identical to rejected) are dropped and counted per reason in the
:class:`LoadReport`; if more than ``max_drop_fraction`` (default half) of the rows would be dropped,
loading fails instead of silently training on a sliver of the data.

Example::

    pairs, report = load_preferences("train.jsonl")
    pairs, too_long = drop_too_long(pairs, lambda p: n_tokens(p), max_tokens=1024)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "LoadReport",
    "PreferencePair",
    "drop_too_long",
    "load_jsonl",
    "load_parquet",
    "load_preferences",
    "load_records",
]

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Text = str | list[Message]

_CORE_FIELDS = ("prompt", "chosen", "rejected", "margin")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")

# Drop reasons, in the order they are tested.
EMPTY_CHOSEN = "empty_chosen"
EMPTY_REJECTED = "empty_rejected"
IDENTICAL = "identical"
TOO_LONG = "too_long"


class DataError(ValueError):
    """A preference dataset that cannot be used as given.

    ``row`` is the 0-based index of the offending data row (``None`` for whole-dataset problems such
    as the drop guard), ``field`` the column or sub-field (``"chosen[1].content"``), if any.
    """

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.row = row
        self.field = field


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is preferred over ``rejected`` as a reply to ``prompt``.

    ``prompt``/``chosen``/``rejected`` are either all plain strings or all message lists
    (``[{"role": "user", "content": "..."}]``). ``margin`` is the optional preference strength;
    ``meta`` holds every other column of the row (e.g. the testbed's ``task``, ``artifacts``).
    """

    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_conversational(self) -> bool:
        """True when the texts are chat message lists rather than plain strings."""
        return isinstance(self.chosen, list)


@dataclass
class LoadReport:
    """What happened to the rows of one source: read, kept, dropped (count per reason)."""

    source: str
    rows_read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        """Total rows dropped, all reasons together."""
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for logs and training provenance)."""
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
        }

    def __str__(self) -> str:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"source={self.source} rows_read={self.rows_read} kept={self.kept} dropped=[{reasons}]"


# ---------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------


def load_preferences(
    source: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    *,
    max_drop_fraction: float = 0.5,
) -> tuple[list[PreferencePair], LoadReport]:
    """Load preference pairs from a ``.jsonl``/``.parquet`` path or a list of row dicts.

    Example::

        pairs, report = load_preferences([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}])
        assert report.kept == 1
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        name = path.name.lower()
        if name.endswith(_JSONL_SUFFIXES):
            return load_jsonl(path, max_drop_fraction=max_drop_fraction)
        if name.endswith(_PARQUET_SUFFIXES):
            return load_parquet(path, max_drop_fraction=max_drop_fraction)
        raise DataError(
            f"{path}: unsupported file type; use one of {_JSONL_SUFFIXES + _PARQUET_SUFFIXES} "
            "or pass a list of row dicts"
        )
    return load_records(source, max_drop_fraction=max_drop_fraction)


def load_records(
    records: Iterable[Mapping[str, Any]],
    *,
    source: str = "<records>",
    max_drop_fraction: float = 0.5,
) -> tuple[list[PreferencePair], LoadReport]:
    """Load pairs from in-memory rows (dicts). Rows are copied; the input is not modified."""
    return _load(((i, r, f"row {i} of {source}") for i, r in enumerate(records)), source, max_drop_fraction)


def load_jsonl(
    path: str | os.PathLike[str], *, max_drop_fraction: float = 0.5
) -> tuple[list[PreferencePair], LoadReport]:
    """Load pairs from a JSON Lines file (one JSON object per line; blank lines are skipped)."""
    path = Path(path)
    return _load(_iter_jsonl(path), str(path), max_drop_fraction)


def load_parquet(
    path: str | os.PathLike[str], *, max_drop_fraction: float = 0.5
) -> tuple[list[PreferencePair], LoadReport]:
    """Load pairs from a Parquet file (read with pyarrow; nulls count as missing values)."""
    import pyarrow.parquet as pq  # local: pyarrow is a training/serving extra, not a client dependency

    path = Path(path)
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on a bad file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
    return _load(((i, r, f"row {i} of {path}") for i, r in enumerate(rows)), str(path), max_drop_fraction)


def drop_too_long(
    pairs: Sequence[PreferencePair],
    length_fn: Callable[[PreferencePair], int],
    max_tokens: int,
    *,
    max_drop_fraction: float = 0.5,
) -> tuple[list[PreferencePair], LoadReport]:
    """Drop pairs whose ``length_fn(pair)`` exceeds ``max_tokens``; count what was dropped.

    ``length_fn`` is supplied by the trainer (it owns the tokenizer), typically the token count of the
    longer of prompt+chosen and prompt+rejected. Raises :class:`DataError` if more than
    ``max_drop_fraction`` of the pairs are too long (raise ``max_tokens`` or shorten the data).

    Example::

        kept, report = drop_too_long(pairs, lambda p: len(p.chosen) // 4, max_tokens=512)
    """
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    _check_fraction(max_drop_fraction)
    report = LoadReport(source="drop_too_long", rows_read=len(pairs))
    kept: list[PreferencePair] = []
    for i, pair in enumerate(pairs):
        n = length_fn(pair)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"length_fn returned {n!r} for pair {i}; expected an int >= 0", row=i)
        if n > max_tokens:
            report.dropped[TOO_LONG] = report.dropped.get(TOO_LONG, 0) + 1
        else:
            kept.append(pair)
    report.kept = len(kept)
    _guard_drops(report, max_drop_fraction, hint=f"raise max_tokens (now {max_tokens}) or shorten the data")
    if report.n_dropped:
        logger.info("dropped_too_long count=%d of=%d max_tokens=%d", report.n_dropped, len(pairs), max_tokens)
    return kept, report


# ---------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any, str]]:
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}") from exc
    with handle:
        row = 0
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"row {row} (line {line_no}) of {path}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg}", row=row) from exc
            yield row, obj, where
            row += 1


def _load(
    rows: Iterable[tuple[int, Any, str]], source: str, max_drop_fraction: float
) -> tuple[list[PreferencePair], LoadReport]:
    _check_fraction(max_drop_fraction)
    report = LoadReport(source=source)
    pairs: list[PreferencePair] = []
    for row, obj, where in rows:
        report.rows_read += 1
        pair, reason = _parse_row(obj, row, where)
        if reason is not None:
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            continue
        assert pair is not None
        pairs.append(pair)
    report.kept = len(pairs)
    if report.rows_read == 0:
        raise DataError(f"{source}: no rows")
    _guard_drops(report, max_drop_fraction, hint="check the column contents")
    logger.info("loaded_preferences %s", report)
    return pairs, report


def _check_fraction(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"max_drop_fraction must be within [0, 1], got {value!r}")


def _guard_drops(report: LoadReport, max_drop_fraction: float, *, hint: str) -> None:
    if report.rows_read and report.n_dropped > max_drop_fraction * report.rows_read:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(report.dropped.items()))
        raise DataError(
            f"{report.source}: {report.n_dropped} of {report.rows_read} rows would be dropped ({reasons}), "
            f"more than max_drop_fraction={max_drop_fraction}; {hint}, or pass a larger max_drop_fraction"
        )


def _parse_row(obj: Any, row: int, where: str) -> tuple[PreferencePair | None, str | None]:
    """Validate one row; return (pair, None) or (None, drop_reason). Raise DataError if malformed."""
    if not isinstance(obj, Mapping):
        raise DataError(
            f"{where}: expected an object with chosen/rejected, got {type(obj).__name__}", row=row
        )
    for name in ("chosen", "rejected"):
        if obj.get(name) is None:
            raise DataError(f"{where}: field '{name}' is missing", row=row, field=name)
    chosen = _parse_text(obj["chosen"], "chosen", row, where)
    rejected = _parse_text(obj["rejected"], "rejected", row, where)
    conversational = isinstance(chosen, list)
    if isinstance(rejected, list) != conversational:
        raise DataError(
            f"{where}: field 'rejected' must be a {'message list' if conversational else 'string'} like "
            "'chosen' (do not mix plain strings and chat messages in one row)",
            row=row,
            field="rejected",
        )
    implicit = obj.get("prompt") is None
    if implicit:
        prompt: Text = [] if conversational else ""
    else:
        prompt = _parse_text(obj["prompt"], "prompt", row, where)
        if isinstance(prompt, list) != conversational:
            raise DataError(
                f"{where}: field 'prompt' must be a {'message list' if conversational else 'string'} like "
                "'chosen' (do not mix plain strings and chat messages in one row)",
                row=row,
                field="prompt",
            )
    margin = _parse_margin(obj.get("margin"), row, where)
    reason = _drop_reason(chosen, rejected)
    if reason is None and implicit:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected)
        reason = _drop_reason(chosen, rejected)  # e.g. chosen was a strict prefix of rejected
    if reason is not None:
        return None, reason
    meta = {k: v for k, v in obj.items() if k not in _CORE_FIELDS}
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, meta=meta), None


def _parse_text(value: Any, name: str, row: int, where: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        messages: list[Message] = []
        for j, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                raise DataError(
                    f"{where}: field '{name}[{j}]' must be a message object with role and content, "
                    f"got {type(msg).__name__}",
                    row=row,
                    field=f"{name}[{j}]",
                )
            for key in ("role", "content"):
                if not isinstance(msg.get(key), str):
                    got = "missing" if msg.get(key) is None else type(msg.get(key)).__name__
                    raise DataError(
                        f"{where}: field '{name}[{j}].{key}' must be a string, got {got}",
                        row=row,
                        field=f"{name}[{j}].{key}",
                    )
            messages.append(dict(msg))
        return messages
    raise DataError(
        f"{where}: field '{name}' must be a string or a list of messages, got {type(value).__name__}",
        row=row,
        field=name,
    )


def _parse_margin(value: Any, row: int, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            f"{where}: field 'margin' must be a finite number, got {value!r}", row=row, field="margin"
        )
    return float(value)


def _drop_reason(chosen: Text, rejected: Text) -> str | None:
    if _is_empty(chosen):
        return EMPTY_CHOSEN
    if _is_empty(rejected):
        return EMPTY_REJECTED
    if chosen == rejected:
        return IDENTICAL
    return None


def _is_empty(text: Text) -> bool:
    if isinstance(text, str):
        return not text.strip()
    return not any(m["content"].strip() for m in text)


def _split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two full conversations (or texts) into (shared prefix, chosen rest, rejected rest)."""
    n = min(len(chosen), len(rejected))
    idx = 0
    while idx < n and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and isinstance(rejected, str):
        if idx < max(len(chosen), len(rejected)):
            # Do not cut inside a word: back off to the start of the word the texts differ in.
            while idx > 0 and not chosen[idx - 1].isspace():
                idx -= 1
            # TRL's rule: a separating space belongs to the response, not the prompt.
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
        return chosen[:idx], chosen[idx:], rejected[idx:]
    assert isinstance(chosen, list) and isinstance(rejected, list)
    return list(chosen[:idx]), list(chosen[idx:]), list(rejected[idx:])
