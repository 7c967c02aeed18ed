"""The ``rewardkit`` command: serve, score, train, eval, testbed, bench.

Each subcommand lives next to the code it drives and registers itself through ``add_parser(subparsers)``; this
module only wires them together, importing heavy dependencies lazily so ``rewardkit --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, attribute) of each subcommand's add_parser; a missing optional part is skipped with a note in --help.
_COMMANDS = [
    ("rewardkit.server.cli", "add_parser"),
    ("rewardkit.training.score_cli", "add_parser"),
    ("rewardkit.training.cli", "add_parser"),
    ("rewardkit.training.testbed.cli", "add_parser"),
    ("rewardkit.training.bench_cli", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardkit", description="Reward models for RLHF: serve, score, train, eval.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name, attr in _COMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("rewardkit"):
                continue  # that part is not built yet
            raise
        getattr(mod, attr)(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        raise SystemExit(2)
    raise SystemExit(args.func(args) or 0)


if __name__ == "__main__":
    main(sys.argv[1:])
