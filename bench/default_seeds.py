"""The default recipe over seeds (issue 14): mean and spread of ``bench/eval_default.py`` results, and McNemar
against the base LM's log-likelihood pooled over seeds (the discordant counts of each seed summed; LL is the same
on every seed, so this is the pooled paired test).

    for s in 1 2; do rewardkit train bt --default-head --seed $s --output-dir runs/default-s$s
      python bench/eval_default.py --model runs/default-s$s --name pooled_ll_s$s \\
        --json bench/results/default_candidate_pooled_ll_s$s.json; done
    python bench/default_seeds.py bench/results/default_candidate_pooled_ll.json \\
        bench/results/default_candidate_pooled_ll_s1.json bench/results/default_candidate_pooled_ll_s2.json
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path


def exact_p(a: int, b: int) -> float:
    n = a + b
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n)


def main(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out: dict = {"runs": paths, "sets": {}}
    for name in runs[0]["sets"]:
        accs = [r["sets"][name]["candidate"] for r in runs]
        a = sum(r["sets"][name]["vs_ll"]["a_only"] for r in runs)
        b = sum(r["sets"][name]["vs_ll"]["b_only"] for r in runs)
        out["sets"][name] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                             "seeds": accs, "ll": runs[0]["sets"][name]["ll"],
                             "pooled_vs_ll": {"a_only": a, "b_only": b, "p": exact_p(a, b)}}
        s = out["sets"][name]
        print(f"{name:<32} {s['mean']:.3f} +- {s['sd']:.3f}  LL {s['ll']:.3f}  pooled p={s['pooled_vs_ll']['p']:.2g}"
              f" ({a}/{b})")
    Path("bench/results/default_seeds.json").write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
