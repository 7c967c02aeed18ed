"""Reproduce the committed default head (``core/rewardkit/core/default_head/``).

One command::

    python -m rewardkit.training.reproduce_default            # testbed -> train -> eval -> default_head/

It generates the seed-0 testbed into ``data/testbed`` (if missing), trains a Bradley-Terry head on the frozen embedded
SmolLM2-135M-Instruct backbone with :data:`DEFAULT_HEAD_RECIPE` (the same preset as ``rewardkit train bt
--default-head``), and writes the checkpoint to ``--out``. The numbers in docs/results.md came from this recipe.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from rewardkit.core.loading import DEFAULT_HEAD_DIR

# Modest on purpose: the backbone forward over the training pairs dominates (2 x 500 texts on 2 shared CPU cores).
DEFAULT_HEAD_RECIPE: dict[str, Any] = {
    "model": "embedded",
    "mode": "frozen",
    "train_file": "data/testbed",
    "max_train_pairs": 500,
    "max_length": 1024,
    "learning_rate": 3e-3,
    "weight_decay": 0.01,
    "num_epochs": 30.0,
    "batch_size": 32,
    "warmup_ratio": 0.05,
    "center_rewards_coefficient": 0.01,
    "seed": 0,
    "output_dir": str(DEFAULT_HEAD_DIR),
    "model_id": "smollm2-135m-instruct-rewardkit-bt",
    "feature_cache_dir": "data/feature-cache",
}


def main(argv: list[str] | None = None) -> int:
    from rewardkit.training.bt import train_bt
    from rewardkit.training.config import BTConfig
    from rewardkit.training.testbed import make_testbed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default="data/testbed", help="testbed directory (made with seed 0 if missing)")
    p.add_argument("--out", default=str(DEFAULT_HEAD_DIR), help="where the checkpoint goes")
    args = p.parse_args(argv)
    if not (Path(args.testbed) / "train.jsonl").is_file():
        make_testbed(args.testbed, seed=0)
    cfg = BTConfig(**{**DEFAULT_HEAD_RECIPE, "train_file": args.testbed, "output_dir": args.out})
    result = train_bt(cfg, command="python -m rewardkit.training.reproduce_default " + shlex.join(sys.argv[1:]))
    print(result.metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
