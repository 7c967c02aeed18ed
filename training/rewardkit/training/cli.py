"""``rewardkit train <trainer>`` and ``rewardkit eval``.

Trainers register in :data:`TRAINERS`: (name, help, config class, run function, preset overrides). Adding one (RRM,
Id-RM) is one entry: its flags come from its config dataclass through
:func:`rewardkit.training.config.add_config_arguments`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from typing import Any

from rewardkit.training.config import BTConfig, add_config_arguments, config_from_args

__all__ = ["TRAINERS", "add_parser"]


def _run_bt(cfg: Any, command: str) -> dict[str, Any]:
    from rewardkit.training.bt import train_bt

    result = train_bt(cfg, command=command)
    return {"output_dir": str(result.output_dir), **result.metrics}


# name -> (help, config class, run(cfg, command) -> metrics dict)
TRAINERS: dict[str, tuple[str, type[Any], Callable[[Any, str], dict[str, Any]]]] = {
    "bt": ("Bradley-Terry reward model (frozen backbone, LoRA or full fine-tune)", BTConfig, _run_bt),
}


def _register_robust() -> None:
    """RRM and Id-RM (rewardkit.training.rrm / .idrm): BT flags plus their own; see docs/idrm.md. The trainers are
    imported when they run (they import torch); their configs are torch-free, so ``--help`` stays fast."""
    from rewardkit.training.config import IdRMConfig, RRMConfig

    def run(module: str, fn: str) -> Callable[[Any, str], dict[str, Any]]:
        def go(cfg: Any, command: str) -> dict[str, Any]:
            import importlib

            train = getattr(importlib.import_module(module), fn)
            return {"output_dir": str(cfg.output_dir), **train(cfg, command=command).metrics}
        return go

    TRAINERS["rrm"] = ("RRM: BT + causal augmentation (on-prompt beats off-prompt, off-prompt ties), filtered by "
                       "the baseline BT model", RRMConfig, run("rewardkit.training.rrm", "train_rrm"))
    TRAINERS["idrm"] = ("Id-RM: BT + KL to a bidirectional teacher's token-interaction attention (LoRA)",
                        IdRMConfig, run("rewardkit.training.idrm", "train_idrm"))


_register_robust()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``train`` (one sub-command per trainer) and ``eval`` on the top-level subparsers."""
    train = sub.add_parser("train", help="train a reward model", description="Train a reward model; see docs/training.md.")
    tsub = train.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    for name, (help_text, cls, _) in TRAINERS.items():
        p = tsub.add_parser(name, help=help_text, description=help_text)
        if name == "bt":
            p.add_argument("--default-head", action="store_true",
                           help="preset: the recipe of the committed default head (see docs/results.md); "
                                "other flags override it. Writes runs/default-head unless --output-dir or --force")
            p.add_argument("--force", action="store_true",
                           help="with --default-head: overwrite the committed default head inside the package")
        add_config_arguments(p, cls)
        p.set_defaults(func=_train_command(name))
    _add_eval(sub)


def _train_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        _, cls, fn = TRAINERS[name]
        overrides: dict[str, Any] = {}
        if getattr(args, "default_head", False):
            from rewardkit.training.reproduce_default import DEFAULT_HEAD_RECIPE

            overrides = dict(DEFAULT_HEAD_RECIPE)
            if not getattr(args, "force", False):  # never overwrite the packaged head by accident
                overrides["output_dir"] = "runs/default-head"
        elif getattr(args, "force", False):
            print("error: --force only applies with --default-head", file=sys.stderr)
            return 2
        try:
            cfg = config_from_args(cls, args, overrides)
            cfg.validate()
        except (ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        try:
            metrics = fn(cfg, "rewardkit " + shlex.join(sys.argv[1:]))
        except ValueError as exc:  # a set-up problem the config could not see (the model, the data): one line
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return 0
    return run


def _add_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("eval", help="evaluate a reward model on preference pairs",
                       description="Accuracy (overall, per task family, per artifact condition), mean margin, ECE and "
                       "the Id-RM masking probe, on a preference file or every test split of a testbed directory.")
    p.add_argument("--model", default=None, help="rewardkit checkpoint, HF dir, .gguf, or hub id (default: the "
                   "embedded default model)")
    p.add_argument("--data", required=True, help="a .jsonl/.parquet preference file or a testbed directory")
    p.add_argument("--splits", default="", help="comma-separated testbed splits to evaluate (default: all test splits)")
    p.add_argument("--max-pairs", type=int, default=0, help="evaluate a seeded sample of N pairs per file (0 = all)")
    p.add_argument("--max-length", type=int, default=2048, help="max tokens per text; longer pairs are dropped, counted")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="padded tokens per forward")
    p.add_argument("--probe", default="0,0.2,0.4,0.6,0.8",
                   help="masking-probe fractions (comma-separated; empty string = no probe)")
    p.add_argument("--probe-mode", choices=["replace", "drop"], default="replace",
                   help="replace hidden tokens by the pad id, or drop them (= attention-mask them)")
    p.add_argument("--probe-scope", choices=["content", "formatted", "answer"], default="content",
                   help="what the probe hides: prompt and response content tokens (default; the chat template is "
                   "never hidden), the whole formatted text (the old probe), or the answer span only (sanity case)")
    p.add_argument("--probe-max-pairs", type=int, default=0, help="run the probe on the first N pairs only (0 = all)")
    p.add_argument("--relevance", action="store_true", help="also the relevance accuracy: each prompt's own chosen "
                   "response against another pair's chosen response on the same prompt (RRM's causal question)")
    p.add_argument("--feature-cache", default=None, metavar="DIR",
                   help="frozen-backbone heads: compute/reuse reward-token hidden states in DIR and apply the head "
                   "(same numbers as plain scoring, one backbone pass for every head)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from rewardkit.core.loading import load_reward_model
    from rewardkit.training.eval import evaluate_path, format_table, write_json

    try:
        fractions = [float(x) for x in args.probe.split(",") if x.strip()]
    except ValueError:
        print(f"error: --probe must be comma-separated numbers in [0, 1), got {args.probe!r}", file=sys.stderr)
        return 2
    rm = load_reward_model(args.model, device=args.device, dtype=args.dtype)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or None
    try:
        results = evaluate_path(rm, args.data, splits=splits, max_pairs=args.max_pairs, max_length=args.max_length,
                                max_tokens=args.max_batch_tokens, probe_fractions=fractions,
                                probe_mode=args.probe_mode, probe_max_pairs=args.probe_max_pairs,
                                probe_scope=args.probe_scope, relevance=args.relevance,
                                progress=not args.no_progress, feature_cache_dir=args.feature_cache)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model={rm.model_id} head_version={rm.head_version} trained={rm.meta.trained}")
    print(format_table(results))
    if args.json_out:
        write_json(results, args.json_out, {"model": rm.model_id, "head_version": rm.head_version,
                                            "command": "rewardkit " + shlex.join(sys.argv[1:])})
    return 0
