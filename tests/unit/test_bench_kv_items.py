"""bench/bench_kv_items.py: the in-process cache on / off comparison scores the same rewards and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_kv_items",
                                               Path(__file__).parents[2] / "bench" / "bench_kv_items.py")
assert _spec and _spec.loader
bk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bk)


def test_cache_on_and_off_agree_and_json_has_the_rounds(tmp_path: Path) -> None:
    out = tmp_path / "kv.json"
    assert bk.main(["--model", "tiny", "--prompts", "2", "--k", "3", "--rounds", "1", "--threads", "1",
                    "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["items"] == 6 and len(res["ms_per_item"]["on"]) == len(res["ms_per_item"]["off"]) == 1
    assert res["max_abs_diff"] < 1e-4  # the cached prompt gives the full forward's reward
    assert 0.5 < res["prompt_fraction"] < 1.0  # prompts ~4x the completions
    assert res["profile_own_time_fraction"]  # the cache-on round was profiled
