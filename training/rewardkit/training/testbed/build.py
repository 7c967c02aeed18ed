"""Build the testbed: generate every split, write JSONL files and ``manifest.json``.

Generation is seeded per split (``random.Random("rewardkit-testbed:<version>:<seed>:<split>")``, a
string seed that Python hashes with SHA-512, so it does not depend on ``PYTHONHASHSEED``): the same
seed writes byte-identical files, and changing ``n_test`` never changes ``train``.

Example::

    manifest = make_testbed("data/testbed", seed=0)
    manifest["splits"]["train"]["artifacts"]["length"]["agree_rate"]   # ~0.8
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rewardkit.core.checkpoint import atomic_write_bytes
from rewardkit.training.testbed.artifacts import ARTIFACTS, ArtifactPlan, RowPlan, render
from rewardkit.training.testbed.tasks import DEFAULT_FAMILY_WEIGHTS, FAMILIES, generate_task

__all__ = ["GENERATOR_VERSION", "SPLITS", "TestbedConfig", "generate_split", "make_testbed", "split_stats"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"

# split name -> how its artifacts are drawn
SPLITS: dict[str, str] = {
    "train": "mixed",
    "validation": "mixed",
    "validation_clean": "clean",  # held-out pairs with no artifacts: for checks (Id-RM's teacher), not for reporting
    "test": "mixed",
    "test_flip_length": "flip:length",
    "test_flip_boilerplate": "flip:boilerplate",
    "test_flip_format": "flip:format",
    "test_late_evidence": "late_evidence",
    "test_clean": "clean",
}


@dataclass(frozen=True)
class TestbedConfig:
    """Everything that shapes the testbed. Same config -> same bytes."""

    __test__ = False  # not a pytest test class, despite the name

    # sizes and seed
    seed: int = field(default=0, metadata={"help": "Seed of every split."})
    n_train: int = field(default=4000, metadata={"help": "Rows in train."})
    n_val: int = field(default=500, metadata={"help": "Rows in validation."})
    n_test: int = field(default=500, metadata={"help": "Rows in each test split."})
    # spurious correlation
    p_agree: float = field(
        default=0.8,
        metadata={"help": "P(artifact on the chosen response | present) in train/validation/test."},
    )
    presence: dict[str, float] = field(
        default_factory=lambda: {"length": 0.5, "boilerplate": 0.5, "format": 0.4, "evidence_position": 0.3},
        metadata={"help": "P(artifact present) per artifact in train/validation/test."},
    )
    # task mix
    family_weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS),
        metadata={"help": "Sampling weight per task family."},
    )
    # long responses: filler sentences around the evidence
    long_filler_mixed: tuple[int, int] = (6, 10)
    long_filler_late_evidence: tuple[int, int] = (16, 22)

    def validate(self) -> None:
        """Raise ValueError naming the field and its limit."""
        for name in ("n_train", "n_val", "n_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.p_agree <= 1.0:
            raise ValueError(f"p_agree must be within [0, 1], got {self.p_agree!r}")
        if set(self.presence) != set(ARTIFACTS):
            raise ValueError(
                f"presence must have exactly the keys {list(ARTIFACTS)}, got {sorted(self.presence)}"
            )
        for name, rate in self.presence.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"presence[{name!r}] must be within [0, 1], got {rate!r}")
        unknown = set(self.family_weights) - set(FAMILIES)
        if unknown or not any(w > 0 for w in self.family_weights.values()):
            raise ValueError(
                f"family_weights must use families {sorted(FAMILIES)} with a positive weight, got {self.family_weights}"
            )
        if any(w < 0 for w in self.family_weights.values()):
            raise ValueError(f"family_weights must be >= 0, got {self.family_weights}")

    def split_size(self, split: str) -> int:
        """Rows in ``split``."""
        return {"train": self.n_train, "validation": self.n_val, "validation_clean": self.n_val}.get(split, self.n_test)


def _plan_artifacts(rng: random.Random, mode: str, cfg: TestbedConfig) -> dict[str, ArtifactPlan]:
    plans = {name: ArtifactPlan() for name in ARTIFACTS}
    if mode == "mixed":
        for name in ARTIFACTS:
            if rng.random() >= cfg.presence[name]:
                continue
            agrees = rng.random() < cfg.p_agree
            if name == "evidence_position":
                plans[name] = ArtifactPlan(True, "both", agrees, "late" if agrees else "early")
            else:
                plans[name] = ArtifactPlan(True, "chosen" if agrees else "rejected", agrees)
    elif mode.startswith("flip:"):
        plans[mode.removeprefix("flip:")] = ArtifactPlan(True, "rejected", False)
    elif mode == "late_evidence":
        plans["evidence_position"] = ArtifactPlan(True, "both", False, "early")
    elif mode != "clean":
        raise ValueError(f"unknown split mode {mode!r}")
    return plans


def generate_split(split: str, cfg: TestbedConfig | None = None) -> list[dict[str, Any]]:
    """Generate the rows of one split (no files). ``split`` is a key of :data:`SPLITS`."""
    cfg = cfg or TestbedConfig()
    cfg.validate()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    mode = SPLITS[split]
    rng = random.Random(f"rewardkit-testbed:{GENERATOR_VERSION}:{cfg.seed}:{split}")
    families = sorted(cfg.family_weights)
    weights = [cfg.family_weights[f] for f in families]
    long_range = cfg.long_filler_late_evidence if mode == "late_evidence" else cfg.long_filler_mixed
    rows = []
    for i in range(cfg.split_size(split)):
        inst = generate_task(rng.choices(families, weights)[0], rng)
        plan = RowPlan.draw(rng, _plan_artifacts(rng, mode, cfg), long_range=long_range)
        chosen, chosen_span = render(inst.chosen, inst.support, plan, "chosen")
        rejected, rejected_span = render(inst.rejected, inst.support, plan, "rejected")
        rows.append(
            {
                "id": f"{split}-{i:05d}",
                "prompt": inst.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "task": inst.meta,
                "artifacts": {name: p.to_json() for name, p in plan.artifacts.items()},
                "answer_span": {"chosen": list(chosen_span), "rejected": list(rejected_span)},
            }
        )
    return rows


def split_stats(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts and artifact correlation statistics of one split (what ``manifest.json`` records)."""
    n = len(rows)
    artifacts: dict[str, Any] = {}
    for name in ARTIFACTS:
        present = [r["artifacts"][name] for r in rows if r["artifacts"][name]["present"]]
        artifacts[name] = {
            "present_rate": round(len(present) / n, 4) if n else None,
            "agree_rate": round(sum(a["agrees"] for a in present) / len(present), 4) if present else None,
            "on": dict(sorted(Counter(r["artifacts"][name]["on"] for r in rows).items())),
        }
    words_c = [len(r["chosen"].split()) for r in rows]
    words_r = [len(r["rejected"].split()) for r in rows]
    return {
        "rows": n,
        "families": dict(sorted(Counter(r["task"]["family"] for r in rows).items())),
        "artifacts": artifacts,
        # Measured on the text: how much a "longer is better" rule would score on this split.
        "chosen_longer_rate": round(sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / n, 4)
        if n
        else None,
        "rejected_longer_rate": round(sum(len(r["chosen"]) < len(r["rejected"]) for r in rows) / n, 4)
        if n
        else None,
        "mean_words": {"chosen": round(sum(words_c) / n, 1), "rejected": round(sum(words_r) / n, 1)}
        if n
        else None,
        "max_words": max(words_c + words_r, default=0),
    }


def make_testbed(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    *,
    p_agree: float = 0.8,
    config: TestbedConfig | None = None,
) -> dict[str, Any]:
    """Write ``<split>.jsonl`` for every split and ``manifest.json`` into ``out_dir``; return the manifest.

    ``config``, when given, overrides ``seed``/``n_*``/``p_agree``.

    Example::

        manifest = make_testbed("/tmp/tb", seed=1, n_train=200, n_val=50, n_test=50)
    """
    cfg = config or TestbedConfig(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, p_agree=p_agree)
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = generate_split(split, cfg)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        atomic_write_bytes(out / f"{split}.jsonl", data)
        splits[split] = {
            "file": f"{split}.jsonl",
            "sha256": hashlib.sha256(data).hexdigest(),
            **split_stats(rows),
        }
        logger.info("testbed_split split=%s rows=%d", split, len(rows))
    manifest = {
        "generator": "rewardkit.training.testbed",
        "generator_version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "p_agree": cfg.p_agree,
        "counts": {s: v["rows"] for s, v in splits.items()},
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "splits": splits,
    }
    atomic_write_bytes(
        out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    )
    return manifest
