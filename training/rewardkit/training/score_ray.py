"""``rewardkit score --ray``: score a JSONL / Parquet file with Ray Data, one scorer (one model) per actor.

The output is the in-process command's, record for record: the same journal (the output itself for ``.jsonl``,
``OUTPUT.partial.jsonl`` for ``.parquet``), the same records (row, ``row_index``, ``row_sha256``, reward columns),
the same resume rule (rows already journaled are skipped; a changed input is refused) and the same Parquet
written at the end. Rewards equal in-process scoring to fp32 rounding (batches differ: the contract's 1e-5).

The pipeline: the file is read by Ray Data (``read_text`` for JSONL, parsed in the actors exactly as the in-process
reader parses each line; ``read_parquet``), zipped with ``range(rows)`` for each row's index, the journaled rows
dropped, then ``map_batches`` over an actor pool of ``InProcessScorer``s (``--actors``, ``--num-gpus`` per actor;
GPUs by default when the cluster has them). The driver appends each finished batch to the journal (fsynced), in
whatever order batches finish, so a kill at any point loses at most the batches not yet written.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

__all__ = ["score_file_ray"]

IDX = "__rewardkit_row_index__"  # the index column Ray Data carries beside the input's own (which may hold an "id")

# Ray Data's read and zip tasks ask for one CPU each by default; an actor pool that holds every CPU then starves
# them and the run hangs (seen on 2 cores). They are light: a fraction each.
_LIGHT = {"num_cpus": 0.25}


class _RowScorer:
    """One Ray Data actor: an ``InProcessScorer`` (one model) for the batches it is given."""

    def __init__(self, jsonl: bool, scorer_kw: dict[str, Any]) -> None:
        from rewardkit.training.score_io import InProcessScorer

        self.jsonl = jsonl
        self.scorer = InProcessScorer(**scorer_kw)

    def __call__(self, batch: Any) -> dict[str, list[Any]]:
        from rewardkit.training.score_io import row_items, score_chunk

        ids = batch[IDX].to_pylist()
        if self.jsonl:
            rows = [json.loads(t) for t in batch["text"].to_pylist()]
        else:
            rows = batch.drop_columns([IDX]).to_pylist()
        chunk = []
        for idx, row in zip(ids, rows, strict=True):
            keys, items = row_items(row, idx)
            chunk.append((idx, row, keys, items))
        records = score_chunk(chunk, self.scorer)
        return {IDX: ids, "record": [json.dumps(r, ensure_ascii=False) for r in records]}


def score_file_ray(input_path: Path, output_path: Path, scorer_kw: dict[str, Any], *, actors: int | None = None,
                   num_gpus: float | None = None, num_cpus: float = 1.0, chunk_rows: int = 64,
                   ray_address: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``input_path`` into ``output_path`` on Ray (resuming a partial run); return the summary.

    ``scorer_kw``: :class:`InProcessScorer`'s arguments (model, device, dtype, max_length, max_tokens,
    prefix_sharing). ``actors``: scorers (default: one per GPU in the cluster, else 1)."""
    from tqdm.auto import tqdm

    from rewardkit.training.score_io import append_lines, finish_output, prepare_output

    job = prepare_output(input_path, output_path)
    pending = job.total - len(job.done)
    if pending == 0:
        print(f"all {job.total} rows are already in {job.journal}", file=sys.stderr)
        return finish_output(job)
    local = not ray_address
    started = not ray.is_initialized()
    if started:
        if local:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=ray_address, log_to_driver=False)
    try:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        per_actor_gpus = num_gpus if num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
        n_actors = actors or (max(1, int(gpus // per_actor_gpus)) if per_actor_gpus else 1)
        ds = _dataset(input_path, job.total, frozenset(job.done), chunk_rows)
        scored = ds.map_batches(_RowScorer, fn_constructor_kwargs={"jsonl": not _is_parquet(input_path),
                                                                   "scorer_kw": scorer_kw},
                                batch_size=chunk_rows, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=n_actors),
                                num_gpus=per_actor_gpus, num_cpus=num_cpus)
        log.info("score_ray actors=%d num_gpus=%g num_cpus=%g pending=%d", n_actors, per_actor_gpus, num_cpus, pending)
        bar = tqdm(total=job.total, initial=len(job.done), unit="row", desc="score (ray)", disable=not progress,
                   dynamic_ncols=True)
        with job.journal.open("a", encoding="utf-8") as fh:
            for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
                lines = batch["record"].to_pylist()
                append_lines(fh, lines)
                bar.update(len(lines))
        bar.close()
    finally:
        if started:
            ray.shutdown()
    return finish_output(job)


def _is_parquet(path: Path) -> bool:
    return path.name.lower().endswith((".parquet", ".pq"))


def _dataset(path: Path, total: int, done: frozenset[int], chunk_rows: int) -> Any:
    """Rows of ``path`` with their 0-based index as ``IDX``, journaled rows dropped.

    Ray Data's ``zip`` with an index dataset would number the rows, but its tasks take a whole CPU each and an
    actor pool holding every CPU starves them (a hang, seen on 2 cores). So the file is read first, in order, into
    the object store (light tasks, before any actor exists), each block is numbered from the row counts of the
    blocks before it, and the scorers' pool runs on those blocks."""
    import numpy as np

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the one bar, in rows
    ctx.execution_options.preserve_order = True  # blocks in file order: their row counts give the indices
    if _is_parquet(path):
        src = ray.data.read_parquet(str(path), ray_remote_args=_LIGHT)
    else:  # raw lines, parsed in the actors as the in-process reader does; blank lines are not rows there either
        src = ray.data.read_text(str(path), ray_remote_args=_LIGHT).filter(
            lambda r: bool(r["text"].strip()), num_cpus=_LIGHT["num_cpus"])
    blocks = src.to_arrow_refs()
    counts = ray.get([_num_rows.options(**_LIGHT).remote(b) for b in blocks])
    if sum(counts) != total:
        raise RuntimeError(f"Ray Data read {sum(counts)} rows from {path}, the in-process reader {total}")
    done_ref = ray.put(np.array(sorted(done), dtype=np.int64))
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    numbered = [_numbered.options(**_LIGHT).remote(b, int(off), start, min(start + chunk_rows, n), done_ref)
                for b, off, n in zip(blocks, offsets, counts, strict=True) for start in range(0, n, chunk_rows)]
    return ray.data.from_arrow_refs(numbered)  # type: ignore[arg-type]  # two ObjectRef classes, one object


@ray.remote
def _num_rows(table: Any) -> int:
    return int(table.num_rows)


@ray.remote
def _numbered(table: Any, offset: int, start: int, stop: int, done: Any) -> Any:
    """Rows ``start:stop`` of a block with an ``IDX`` column (their indices in the file; the block starts at
    ``offset``), rows already journaled dropped."""
    import numpy as np
    import pyarrow as pa

    ids = np.arange(offset + start, offset + stop, dtype=np.int64)
    out = table.slice(start, stop - start).add_column(0, IDX, pa.array(ids))
    if len(done):
        out = out.filter(pa.array(~np.isin(ids, done)))
    return out
