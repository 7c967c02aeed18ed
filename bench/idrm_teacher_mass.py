"""Where Id-RM's teacher puts its mass: the share on each response's answer span, against the span's uniform share.

    python bench/idrm_teacher_mass.py --out runs/idrm-B --seeds 0,1,2

Reads the teacher distributions that ``rewardkit train idrm`` cached, with the config stored in the run's
``train_log.jsonl`` (run ``bench/bench_robust.py ... --methods idrm`` first; a cache miss fine-tunes the teacher again,
minutes on a CPU) for the seed's training subset, and for every testbed pair with an ``answer_span`` prints the ratio (mass on the span) /
(span characters / response characters): 1.0 = no preference for the evidence, higher = the teacher reads the answer.
Split by whether the response carries the length artifact (padding sentences after the answer).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path


def span_share(mass: Sequence[float], span: Sequence[int]) -> tuple[float, float]:
    """(mass on the characters ``span[0]:span[1]``, that mass / the span's uniform share ``(b - a) / len(mass)``)."""
    a, b = int(span[0]), int(span[1])
    if not 0 <= a < b <= len(mass):
        raise ValueError(f"span {span} outside a response of {len(mass)} characters")
    share = float(sum(mass[a:b]))
    return share, share / ((b - a) / len(mass))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/idrm-B", help="bench_robust.py's --out (holds idrm-sN/train_log.jsonl)")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)

    from rewardkit.core.formatting import Formatter
    from rewardkit.core.loading import load_reward_model
    from rewardkit.training.features import encode_pairs
    from rewardkit.training.idrm import IdRMConfig, teacher_targets
    from rewardkit.training.loop import load_pairs as _load_pairs

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        with open(Path(args.out) / f"idrm-s{seed}" / "train_log.jsonl", encoding="utf-8") as f:
            cfg = IdRMConfig(**json.loads(f.readline())["config"])  # the run's own config: the same cache key
        pairs, _, _ = _load_pairs(cfg.train_file, "train", cfg.max_train_pairs, cfg.seed, cfg.max_drop_fraction)
        rm = load_reward_model(cfg.model, device="cpu", dtype="float32")
        enc, _ = encode_pairs(pairs, Formatter(rm.tokenizer, max_length=cfg.max_length))
        masses, report = teacher_targets(cfg, enc)
        for ep, (mc, mr) in zip(enc, masses, strict=True):
            span = ep.pair.meta.get("answer_span")
            length = (ep.pair.meta.get("artifacts") or {}).get("length") or {}
            if not span:
                continue
            for side, mass in (("chosen", mc), ("rejected", mr)):  # char masses: one entry per response character
                if span[side][1] <= span[side][0] or mass.sum() <= 0:
                    continue
                share, ratio = span_share(mass.tolist(), span[side])
                padded = bool(length.get("present")) and length.get("on") == side
                rows.append((seed, padded, ratio, share))
        print(f"seed {seed}: cache_hit={report.get('cache_hit')} teacher_accuracy={report.get('teacher_accuracy')}")
    for name, sel in (("all", rows), ("padded (length artifact)", [r for r in rows if r[1]]),
                      ("not padded", [r for r in rows if not r[1]])):
        if not sel:
            continue
        ratios = [r[2] for r in sel]
        shares = [r[3] for r in sel]
        above = sum(x > 1 for x in ratios) / len(ratios)
        print(f"{name:26s} n={len(sel):4d}  span mass / uniform: mean {statistics.mean(ratios):.2f} "
              f"median {statistics.median(ratios):.2f}  above uniform {100 * above:.0f}%  "
              f"mass on span: mean {statistics.mean(shares):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
