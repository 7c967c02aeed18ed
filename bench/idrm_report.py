"""Issue 20, part 2-3: merge the Id-RM arm runs of ``bench/bench_robust.py`` and print what the goals ask.

    python bench/idrm_report.py runs/idrm2/results-*.json --out bench/results/robust/idrm_v2.json
    python bench/idrm_report.py runs/rrm_lora/results-*.json --arm rrm_lora --controls bt_lora,rrm_lora_u1,bt

Prints: the teacher's held-out check per seed (the gate), mean ± sd over seeds of every evaluated set per arm, the
paired tests (McNemar's discordant pairs pooled over seeds, exact two-sided sign test) of Id-RM against each
control, and for the unseen styles how far each arm moves from its own outside_clean accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_robust import paired, table  # noqa: E402

STYLES = ("enthusiasm", "emoji", "citation", "confidence", "bold", "repetition")


def merge(files: list[Path]) -> list[dict[str, Any]]:
    """Every (method, seed) once: a trained run wins over a refused record of the same arm."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for f in files:
        for r in json.loads(f.read_text()):
            key = (r["method"], r["seed"])
            r = {**r, "source": f.name}
            if r.get("refused"):
                best.setdefault((r["method"] + "_gated", r["seed"]), {**r, "method": r["method"] + "_gated"})
                continue
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["method"], r["seed"]))


def gate(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in runs:
        t = (r.get("metrics") or {}).get("teacher") or {}
        if r["method"] == "idrm" and "teacher_val_accuracy" in t:
            out.append(f"seed {r['seed']}: teacher {t['teacher_val_accuracy']:.3f} vs starting BT "
                       f"{t['student_val_accuracy']:.3f} on {t['teacher_val_pairs']} validation_clean pairs "
                       f"(gain {t['teacher_val_gain']:+.3f}; teacher train acc {t.get('teacher_accuracy', 0):.3f}, "
                       f"{t.get('teacher_seconds', 0):.0f} s)")
    return out


def styles(runs: list[dict[str, Any]]) -> list[str]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if not r.get("refused") and "outside_clean" in r["eval"]:
            by.setdefault(r["method"], []).append(r["eval"])
    lines = ["unseen styles: mean over seeds of (style accuracy - outside_clean), on_wrong / on_right"]
    for m, evs in by.items():
        cells = []
        for st in STYLES:
            d = [statistics.mean(e[f"outside_{st}_on_{side}"] - e["outside_clean"] for e in evs)
                 for side in ("wrong", "right")]
            cells.append(f"{st} {100 * d[0]:+.0f}/{100 * d[1]:+.0f}")
        lines.append(f"{m}: " + ", ".join(cells))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="")
    ap.add_argument("--arm", default="idrm", help="the arm the paired tests compare (e.g. rrm_lora)")
    ap.add_argument("--controls", default="bt_lora,idrm_shuffled,idrm_uniform,bt",
                    help="comma-separated arms it is compared against (missing ones are skipped)")
    a = ap.parse_args()
    runs = merge([Path(f) for f in a.files])
    if a.out:
        Path(a.out).write_text(json.dumps(runs, indent=1, sort_keys=True))
    print("\n".join(gate(runs)))
    print(table(runs))
    trained = [r for r in runs if not r.get("refused")]
    have = {r["method"] for r in trained}
    for b in a.controls.split(","):
        if a.arm in have and b in have:
            print(paired(trained, a.arm, b))
    print("\n".join(styles(runs)))


if __name__ == "__main__":
    main()
