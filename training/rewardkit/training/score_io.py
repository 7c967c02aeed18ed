"""The work behind ``rewardkit score`` (see ``score_cli`` for the command and the file formats): rows and their
reward items, the append-only journal, the in-process and remote scorers, ``score_file``."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["InProcessScorer", "OutputJob", "RemoteScorer", "ScoreInputError", "append_lines", "check_input",
           "finish_output", "iter_rows", "journal_hashes", "prepare_output", "read_journal", "row_items", "row_sha256",
           "score_chunk", "score_file", "summarise"]

REWARD_KEYS = ("reward", "reward_chosen", "reward_rejected")


class ScoreInputError(ValueError):
    """An input row that cannot be scored; the message names the row and the field."""


# ---------------------------------------------------------------------------------------------- rows and items


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a .jsonl (streamed) or .parquet file."""
    for _, row in iter_rows_located(path):
        yield row


def iter_rows_located(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) pairs: ``where`` is ``row I (line L)`` for JSONL, ``row I`` for Parquet (I 0-based, L 1-based)."""
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
            raise ScoreInputError(f"{path}: not a readable Parquet file: {exc}") from exc
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"row {i}", row
                i += 1
        return
    if not name.endswith((".jsonl", ".ndjson")):
        raise ScoreInputError(f"{path}: unsupported input type; use .jsonl or .parquet")
    with path.open("r", encoding="utf-8") as fh:
        row = 0
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"row {row} (line {line_no})"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScoreInputError(f"{path} {where}: invalid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ScoreInputError(f"{path} {where}: expected a JSON object")
            yield where, obj
            row += 1


def row_sha256(row: dict[str, Any]) -> str:
    """Hash of an input row's content (canonical JSON), kept in each output record to detect a changed input."""
    import hashlib

    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:32]


def check_input(path: Path) -> int:
    """Read and check every row before any model work; return the row count. Raises :class:`ScoreInputError`."""
    n = 0
    for where, row in iter_rows_located(path):
        row_items(row, n, where)
        n += 1
    if n == 0:
        raise ScoreInputError(f"{path} has no rows: nothing to score")
    return n


def _text_or_messages(value: Any, field: str, where: str) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ScoreInputError(f"{where}: field '{field}' must be a string or a list of {{role, content}} messages")


def _item(prompt: Any, response: Any) -> dict[str, Any]:
    """The /v1/rewards item (and in-process ScoreItem fields) for a prompt and a response."""
    if isinstance(response, list):
        msgs = (prompt if isinstance(prompt, list) else
                [{"role": "user", "content": prompt}] if prompt else []) + response
        return {"messages": msgs}
    if isinstance(prompt, list):
        return {"messages": prompt + [{"role": "assistant", "content": response}]}
    if prompt is None or prompt == "":
        return {"text": response}
    return {"prompt": prompt, "response": response}


def row_items(row: dict[str, Any], index: int, where: str | None = None) -> tuple[list[str], list[dict[str, Any]]]:
    """(output reward keys, items to score) for one row; raises :class:`ScoreInputError` naming the row/field."""
    where = where or f"row {index}"
    if "chosen" in row or "rejected" in row:
        for f in ("chosen", "rejected"):
            if row.get(f) is None:
                raise ScoreInputError(f"{where}: field '{f}' is missing (preference rows need chosen and rejected)")
        prompt = None if row.get("prompt") is None else _text_or_messages(row["prompt"], "prompt", where)
        c = _text_or_messages(row["chosen"], "chosen", where)
        r = _text_or_messages(row["rejected"], "rejected", where)
        return ["reward_chosen", "reward_rejected"], [_item(prompt, c), _item(prompt, r)]
    if "completion" in row:
        prompt = None if row.get("prompt") is None else _text_or_messages(row["prompt"], "prompt", where)
        return ["reward"], [_item(prompt, _text_or_messages(row["completion"], "completion", where))]
    if "messages" in row:
        msgs = _text_or_messages(row["messages"], "messages", where)
        if not isinstance(msgs, list) or not msgs or msgs[-1]["role"] != "assistant":
            raise ScoreInputError(f"{where}: field 'messages' must end with the assistant's message")
        return ["reward"], [{"messages": msgs}]
    raise ScoreInputError(f"{where}: no scorable fields; expected chosen/rejected (+prompt), prompt/completion, "
                          f"or messages; got {sorted(row)}")


# ---------------------------------------------------------------------------------------------- journal


def read_journal(path: Path) -> set[int]:
    """Row indices already in the journal (see :func:`journal_hashes`)."""
    return set(journal_hashes(path))


def journal_hashes(path: Path) -> dict[int, str | None]:
    """Row index -> the input row's hash (None for records without one), for rows already in the journal. A torn
    tail (a last line without its newline, or a line that is not a complete record) is cut off the file, so appends
    continue after the last good record."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    done: dict[int, str | None] = {}
    good_end = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn: the writer died before the newline
        if line.strip():
            try:
                rec = json.loads(line)
                done[int(rec["row_index"])] = rec.get("row_sha256")
            except (ValueError, KeyError, TypeError):
                break  # corrupt: keep what came before it
        good_end += len(line)
    if good_end < len(data):
        log.warning("score_resume dropping %d torn bytes at the end of %s", len(data) - good_end, path)
        with path.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return done


def _append(fh: Any, records: Sequence[dict[str, Any]]) -> None:
    append_lines(fh, [json.dumps(r, ensure_ascii=False) for r in records])


def append_lines(fh: Any, lines: Sequence[str]) -> None:
    """Append JSON lines to the journal, flushed and fsynced before the caller goes on."""
    fh.write("".join(line + "\n" for line in lines))
    fh.flush()
    os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- scorers


class InProcessScorer:
    """Scores with a model loaded in this process: the server's Formatter and Scorer, token-budget batches."""

    def __init__(self, model: str | None, device: str, dtype: str | None, max_length: int, max_tokens: int,
                 prefix_sharing: bool = False) -> None:
        from rewardkit.core.formatting import Formatter
        from rewardkit.core.loading import load_reward_model
        from rewardkit.core.scoring import Scorer

        self.rm = load_reward_model(model, device=device, dtype=dtype)
        self.fmt = Formatter(self.rm.tokenizer, max_length=max_length)
        # Prefix sharing is exact (to fp32 rounding) but measured slower for scoring files on a CPU; opt in.
        self.scorer = Scorer(self.rm, prefix_sharing=prefix_sharing)
        self.max_tokens = max_tokens

    def __call__(self, items: list[dict[str, Any]]) -> list[float]:
        from rewardkit.core.formatting import ScoreItem

        enc = [self.fmt.encode(ScoreItem(**it), i) for i, it in enumerate(items)]
        order = sorted(range(len(enc)), key=lambda i: enc[i].num_tokens)
        out = [0.0] * len(enc)
        start = 0
        while start < len(order):  # token-budget batches over the length-sorted chunk
            end = start + 1
            while end < len(order) and (end - start + 1) * enc[order[end]].num_tokens <= self.max_tokens:
                end += 1
            batch = order[start:end]
            for i, s in zip(batch, self.scorer.score_batch([enc[i] for i in batch]), strict=True):
                out[i] = s.reward
            start = end
        return out


class RemoteScorer:
    """Scores through a :class:`rewardkit.client.RewardClient` (splitting, retries and backoff are the client's)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __call__(self, items: list[dict[str, Any]]) -> list[float]:
        return list(self.client.score(items=items))


# ---------------------------------------------------------------------------------------------- the command


def score_file(input_path: Path, output_path: Path, scorer: Any, *, chunk_rows: int = 64, progress: bool = True
               ) -> dict[str, Any]:
    """Score every row of ``input_path`` into ``output_path`` (resuming a previous partial run); return a summary."""
    from tqdm.auto import tqdm

    job = prepare_output(input_path, output_path)
    bar = tqdm(total=job.total, initial=len(job.done), unit="row", desc="score", disable=not progress,
               dynamic_ncols=True)
    with job.journal.open("a", encoding="utf-8") as fh:
        chunk: list[tuple[int, dict[str, Any], list[str], list[dict[str, Any]]]] = []
        for idx, (where, row) in enumerate(iter_rows_located(input_path)):
            if idx in job.done:
                continue
            keys, items = row_items(row, idx, where)
            chunk.append((idx, row, keys, items))
            if len(chunk) >= chunk_rows:
                _flush_chunk(fh, chunk, scorer)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            _flush_chunk(fh, chunk, scorer)
            bar.update(len(chunk))
    bar.close()
    return finish_output(job)


@dataclasses.dataclass
class OutputJob:
    """Where a scoring run writes: the journal, the rows already in it, the input's row count."""

    input_path: Path
    output_path: Path
    journal: Path
    parquet_out: bool
    done: dict[int, str | None]
    total: int


def prepare_output(input_path: Path, output_path: Path) -> OutputJob:
    """Check the output name, read back the journal (cut a torn tail), check that it belongs to this input."""
    out_name = output_path.name.lower()
    parquet_out = out_name.endswith((".parquet", ".pq"))
    if not parquet_out and not out_name.endswith((".jsonl", ".ndjson")):
        raise ScoreInputError(f"-o {output_path}: use a .jsonl or .parquet output")
    journal = output_path.with_name(output_path.name + ".partial.jsonl") if parquet_out else output_path
    journal.parent.mkdir(parents=True, exist_ok=True)
    done = journal_hashes(journal)
    total = _count_rows(input_path)
    if done and max(done) >= total:
        raise ScoreInputError(f"{journal} holds row_index {max(done)} but {input_path} has {total} rows: it belongs "
                              "to another input; remove it or choose another output")
    if done:
        _check_resume(journal, input_path, done)
        print(f"resumed {len(done)} of {total} rows from {journal}", file=sys.stderr)
    return OutputJob(input_path, output_path, journal, parquet_out, done, total)


def finish_output(job: OutputJob) -> dict[str, Any]:
    """Parquet output from the journal (rows in input order), and the summary."""
    records = _read_records(job.journal)
    if job.parquet_out:
        _write_parquet(records, job.output_path)
    return summarise(records)


def _check_resume(journal: Path, input_path: Path, done: dict[int, str | None]) -> None:
    """Every journaled row must hash to the current input's row at the same index."""
    for idx, (where, row) in enumerate(iter_rows_located(input_path)):
        if idx not in done:
            continue
        have = done[idx]
        if have is None:
            raise ScoreInputError(f"{journal} was written without row hashes (an older rewardkit), so it cannot be "
                                  f"checked against {input_path}; remove it to score again")
        if have != row_sha256(row):
            raise ScoreInputError(f"{journal} was written from a different input: {where} of {input_path} changed "
                                  "since; remove the output (or choose another -o) to score the new input")


def _count_rows(path: Path) -> int:
    if path.name.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    with path.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def _flush_chunk(fh: Any, chunk: list[tuple[int, dict[str, Any], list[str], list[dict[str, Any]]]],
                 scorer: Any) -> None:
    _append(fh, score_chunk(chunk, scorer))


def score_chunk(chunk: Sequence[tuple[int, dict[str, Any], list[str], list[dict[str, Any]]]],
                scorer: Any) -> list[dict[str, Any]]:
    """Output records of (row_index, row, reward keys, items) tuples: the row, its index and hash, its rewards."""
    flat = [it for _, _, _, items in chunk for it in items]
    rewards = scorer(flat)
    records, k = [], 0
    for idx, row, keys, _ in chunk:
        rec = {**row, "row_index": idx, "row_sha256": row_sha256(row)}
        for key in keys:
            rec[key] = rewards[k]
            k += 1
        records.append(rec)
    return records


def _read_records(journal: Path) -> list[dict[str, Any]]:
    with journal.open("r", encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    return sorted(recs, key=lambda r: r["row_index"])


def _write_parquet(records: list[dict[str, Any]], path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rewardkit.core.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    atomic_write_bytes(path, buf.getvalue())


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """count, mean/std reward (per reward column), accuracy when chosen and rejected are present."""
    out: dict[str, Any] = {"count": len(records)}
    for key in REWARD_KEYS:
        vals = [float(r[key]) for r in records if key in r]
        if vals:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
            out[key] = {"mean": mean, "std": std}
    pairs = [(r["reward_chosen"], r["reward_rejected"]) for r in records if "reward_chosen" in r]
    if pairs:
        out["accuracy"] = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs) / len(pairs)
    return out


