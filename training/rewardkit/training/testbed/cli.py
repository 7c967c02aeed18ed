"""``rewardkit testbed make``: the CLI hook for the testbed generator.

The top-level ``rewardkit`` command calls :func:`add_parser` with its subparsers; this module can also
run on its own: ``python -m rewardkit.training.testbed make --out data/testbed``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rewardkit.training.testbed.artifacts import ARTIFACTS
from rewardkit.training.testbed.build import TestbedConfig, make_testbed

__all__ = ["add_parser", "main", "run_make"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``testbed`` (with sub-command ``make``) on ``subparsers``; ``args.func(args)`` runs it."""
    defaults = TestbedConfig()
    testbed = subparsers.add_parser(
        "testbed",
        help="synthetic preference data with known ground truth and spurious artifacts",
        description="Synthetic preference data with known ground truth and controlled spurious artifacts "
        "(see docs/testbed.md).",
    )
    sub = testbed.add_subparsers(dest="testbed_command", metavar="COMMAND", required=True)
    make = sub.add_parser(
        "make",
        help="generate all splits and manifest.json into a directory",
        description="Generate train/validation/test and the flip, late-evidence and clean test splits "
        "as JSONL, plus manifest.json. The same seed gives byte-identical files.",
    )
    make.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    make.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    make.add_argument(
        "--n-train", type=int, default=defaults.n_train, help="train rows (default: %(default)s)"
    )
    make.add_argument(
        "--n-val", type=int, default=defaults.n_val, help="validation rows (default: %(default)s)"
    )
    make.add_argument(
        "--n-test", type=int, default=defaults.n_test, help="rows in each test split (default: %(default)s)"
    )
    make.add_argument(
        "--p-agree",
        type=float,
        default=defaults.p_agree,
        help="probability that a present artifact sits on the chosen response in train/validation/test "
        "(default: %(default)s)",
    )
    make.set_defaults(func=run_make)


def run_make(args: argparse.Namespace) -> int:
    """Generate the testbed described by ``args``; print a summary table; return the exit code."""
    cfg = TestbedConfig(
        seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, p_agree=args.p_agree
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    manifest = make_testbed(args.out, config=cfg)
    print(format_summary(manifest))
    print(f"wrote {len(manifest['splits'])} splits and manifest.json to {args.out}")
    return 0


def format_summary(manifest: dict[str, Any]) -> str:
    """One line per split: rows, words, longer-is-chosen rate, and per-artifact present/agree rates."""
    head = f"{'split':<22} {'rows':>5} {'words':>6} {'longer=chosen':>13}"
    head += "".join(f" {name[:11] + ' pres/agree':>22}" for name in ARTIFACTS)
    lines = [head]
    for name, s in manifest["splits"].items():
        words = (s["mean_words"]["chosen"] + s["mean_words"]["rejected"]) / 2
        line = f"{name:<22} {s['rows']:>5} {words:>6.1f} {s['chosen_longer_rate']:>13.2f}"
        for art in ARTIFACTS:
            a = s["artifacts"][art]
            agree = "-" if a["agree_rate"] is None else f"{a['agree_rate']:.2f}"
            line += f" {a['present_rate']:>15.2f} / {agree:>4}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m rewardkit.training.testbed``)."""
    parser = argparse.ArgumentParser(prog="rewardkit")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(["testbed", *(argv if argv is not None else __import__("sys").argv[1:])])
    return int(args.func(args))
