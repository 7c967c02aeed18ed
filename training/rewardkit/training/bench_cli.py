"""``rewardkit bench NAME [ARGS...]``: run one of the repository's benchmarks (``bench/*.py``).

The benchmarks live in the source checkout (``bench/``), not in the wheel: they start server processes, need ``wrk``
and write ``bench/results/*.json`` next to the code. This command finds the checkout (``--bench-dir``, else
``./bench``, else the folder beside an editable install) and runs the script with this Python, passing ARGS through (options of this command go before NAME).

Example::

    rewardkit bench serving --skip-smollm2     # = python bench/bench_serving.py --skip-smollm2
    rewardkit bench --list
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# name -> script; each prints a table with a ratio against a baseline run in the same process or script
BENCHMARKS = {
    "serving": "bench_serving.py",
    "prefix": "bench_prefix.py",
    "abc": "bench_abc.py",
    "abc-credit": "abc_credit.py",
    "r2m": "bench_r2m.py",
    "robust": "bench_robust.py",
    "soak": "bench_soak.py",
}


def find_bench_dir(explicit: str | None = None) -> Path | None:
    """The ``bench/`` folder: explicit, else under the working directory, else beside the editable source tree."""
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "bench", Path(__file__).resolve().parents[3] / "bench"]
    for c in candidates:
        if (c / "common.py").is_file():
            return c
    return None


def run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        width = max(len(n) for n in BENCHMARKS)
        print("\n".join(f"{n:<{width}}  bench/{s}" for n, s in BENCHMARKS.items()))
        return 0
    if args.name not in BENCHMARKS:
        print(f"unknown benchmark {args.name!r}; choose one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    bench_dir = find_bench_dir(args.bench_dir)
    if bench_dir is None:
        print("bench/ not found: run from the repository checkout or pass --bench-dir DIR", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(bench_dir / BENCHMARKS[args.name]), *args.args]
    return subprocess.call(cmd, cwd=bench_dir.parent)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="run a benchmark from bench/ (ratios against a baseline, JSON results)",
                       description=(__doc__ or "").replace("``", "`"), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (e.g. --help)")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--bench-dir", default=None, help="the repository's bench/ folder (default: ./bench)")
    p.set_defaults(func=run)
