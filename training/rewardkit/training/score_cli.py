"""``rewardkit score INPUT -o OUTPUT``: batch scoring of JSONL / Parquet files, in process or against a server.

Input rows in TRL's shapes (detected per row):

* preference: ``chosen``/``rejected`` (+ optional ``prompt``; strings or message lists) -> ``reward_chosen``,
  ``reward_rejected``
* prompt-completion: ``prompt``/``completion`` (strings or message lists) -> ``reward``
* conversational: ``messages`` (the last one is the assistant's) -> ``reward``

Each output row is the input row plus the reward column(s) and ``row_index`` (the input row's 0-based position).

Resumable: results go to an append-only JSONL journal (the output itself for ``.jsonl``, ``OUTPUT.partial.jsonl``
for ``.parquet``), one chunk at a time, flushed and fsynced before the next chunk starts. On start, the journal is
read back: a torn last line (a kill mid-write) is cut off, rows already there are skipped ("resumed N of M rows"). So
a run killed at any point and started again writes every row exactly once. Each record carries ``row_sha256``, the
hash of its input row: a rerun whose input changed (same row count or not) is refused instead of mixing old and new
rewards. Parquet output is written at the end (atomically, rows in input order) from the journal.

The input is read and checked before the model loads: an unsupported file type, a broken line or an empty file fails
at once. Errors name the row (0-based, as ``row_index``) and, for JSONL, its line (1-based).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rewardkit.training.score_io import (
    InProcessScorer,
    RemoteScorer,
    ScoreInputError,
    check_input,
    iter_rows,
    journal_hashes,
    read_journal,
    row_items,
    row_sha256,
    score_file,
)

__all__ = ["InProcessScorer", "RemoteScorer", "ScoreInputError", "add_parser", "check_input", "iter_rows",
           "journal_hashes", "read_journal", "row_items", "row_sha256", "score_file"]


def _ray_args_error(args: argparse.Namespace) -> str | None:
    given = [f"--{n.replace('_', '-')}" for n in ("actors", "num_gpus", "ray_address") if getattr(args, n) is not None]
    if not args.ray:
        return f"{', '.join(given)}: these flags need --ray" if given else None
    if args.url:
        return "--ray scores in Ray actors; it does not go with --url"
    if args.actors is not None and args.actors < 1:
        return f"--actors must be >= 1 (got {args.actors})"
    if (args.num_gpus is not None and args.num_gpus < 0) or args.num_cpus < 0:
        return "--num-gpus and --num-cpus must be >= 0"
    return None


def _run_ray(args: argparse.Namespace, inp: Path, outp: Path, t0: float) -> int:
    try:
        from rewardkit.training.score_ray import score_file_ray
    except ImportError as exc:
        print(f"error: --ray needs Ray: pip install 'rewardkit[ray]' ({exc})", file=sys.stderr)
        return 2
    scorer_kw = {"model": args.model, "device": args.device, "dtype": args.dtype, "max_length": args.max_length,
                 "max_tokens": args.max_batch_tokens, "prefix_sharing": args.prefix_sharing}
    try:
        summary = score_file_ray(inp, outp, scorer_kw, actors=args.actors, num_gpus=args.num_gpus,
                                 num_cpus=args.num_cpus, chunk_rows=args.chunk_rows, ray_address=args.ray_address,
                                 progress=not args.no_progress)
    except ScoreInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(summary, indent=2))
    return 0


def _unreachable(url: str) -> str | None:
    """None when ``url`` answers ``/health``; else a short reason (no retries: fail in seconds, not ~15 s)."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=httpx.Timeout(10.0, connect=3.0))
    except httpx.ConnectError:
        return "connection refused"
    except httpx.TimeoutException:
        return "no answer within 10 s"
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return None


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``score`` on the top-level subparsers."""
    p = sub.add_parser("score", help="score a JSONL/Parquet file (resumable)",
                       description=(__doc__ or "").replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="input .jsonl or .parquet")
    p.add_argument("-o", "--output", required=True, help="output .jsonl or .parquet (resumed if it exists)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="score in process with this model (default: the embedded default)")
    src.add_argument("--url", default=None, help="score against a running rewardkit server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("REWARDKIT_API_KEY"), help="API key for --url "
                   "(default: $REWARDKIT_API_KEY)")
    p.add_argument("--chunk-rows", type=int, default=64, help="rows per chunk (each chunk is fsynced)")
    p.add_argument("--max-length", type=int, default=2048, help="in process: max tokens per text (prompt cut first)")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="in process: padded tokens per forward")
    p.add_argument("--prefix-sharing", action="store_true",
                   help="in process: run a prompt shared by several texts once (KV reuse); off by default")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--no-progress", action="store_true")
    ray = p.add_argument_group("Ray Data (with --ray; needs pip install 'rewardkit[ray]')")
    ray.add_argument("--ray", action="store_true", help="score on Ray Data: one scorer (one model) per actor")
    ray.add_argument("--actors", type=int, help="scorer actors (default: one per GPU of the cluster, else 1)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per actor (default 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument("--ray-address", help="join this Ray cluster (default: start a local Ray instance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inp, outp = Path(args.input), Path(args.output)
    if not inp.is_file():
        print(f"error: input {inp} does not exist", file=sys.stderr)
        return 2
    if args.chunk_rows < 1:
        print("error: --chunk-rows must be >= 1", file=sys.stderr)
        return 2
    bad = _ray_args_error(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    from rewardkit.core.errors import ConfigError
    from rewardkit.core.preflight import check_model_spec

    try:  # the whole input is checked before the model loads (~60 s) or the server is asked
        check_input(inp)
        if not args.url:
            check_model_spec(args.model)
    except (ScoreInputError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.time()
    if args.ray:
        return _run_ray(args, inp, outp, t0)
    scorer: Any
    if args.url:
        from rewardkit.client import RewardClient

        reason = _unreachable(args.url)
        if reason:
            print(f"error: cannot reach the rewardkit server at {args.url} ({reason}); start it with "
                  "`rewardkit serve` or check --url", file=sys.stderr)
            return 2
        scorer = RemoteScorer(RewardClient(args.url, api_key=args.api_key))
    else:
        scorer = InProcessScorer(args.model, args.device, args.dtype, args.max_length, args.max_batch_tokens,
                                 args.prefix_sharing)
    from rewardkit.client.errors import RewardKitError as ClientError

    try:
        summary = score_file(inp, outp, scorer, chunk_rows=args.chunk_rows, progress=not args.no_progress)
    except ScoreInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:  # the server went away or refused: one line; rows scored so far are kept
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0]} (rows scored so far are kept in {outp}; "
              "run the same command again to resume)", file=sys.stderr)
        return 1
    summary["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(summary, indent=2))
    return 0
