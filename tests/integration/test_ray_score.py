"""``rewardkit score --ray`` for real: Ray Data on a local Ray instance, two scorer actors of a tiny model. The output
equals in-process scoring row for row (JSONL and Parquet), and a run killed with SIGKILL mid-way resumes: every row
once, nothing lost. (Results reach the journal a chunk at a time: with read-block granularity a 240-row run once
finished between two polls, so the kill found nothing left to interrupt.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.training.score_io import InProcessScorer, score_file

pytest.importorskip("ray.data", reason="the ray extra is not installed (pip install 'rewardkit[ray]')")
pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _rows(n: int) -> list[dict[str, object]]:
    """The three TRL shapes mixed, with Unicode and a message list, so each row's own reader path is exercised."""
    out: list[dict[str, object]] = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": f"What is {i} + 1?", "chosen": f"It is {i + 1}.", "rejected": "Nein, ü.", "id": i})
        elif i % 3 == 1:
            out.append({"prompt": f"Name {i}", "completion": "Paris " * (i % 7), "id": i})
        else:
            out.append({"messages": [{"role": "user", "content": f"hi {i}"},
                                     {"role": "assistant", "content": "Hello 🙂"}], "id": i})
    return out


def _cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "rewardkit.cli", "score", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _records(path: Path) -> list[dict[str, object]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                  key=lambda r: int(r["row_index"]))  # type: ignore[arg-type]


def _assert_same(got: list[dict[str, object]], want: list[dict[str, object]]) -> None:
    assert [r["row_index"] for r in got] == [r["row_index"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if not k.startswith("reward")} == \
            {k: v for k, v in w.items() if not k.startswith("reward")}
        for key in ("reward", "reward_chosen", "reward_rejected"):
            assert (key in g) == (key in w)
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6)


def test_score_ray_equals_in_process_jsonl_and_parquet_and_resumes_after_sigkill(tiny_llama_dir: Path,
                                                                                 tmp_path: Path) -> None:
    rows = _rows(480)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" + ("\n" if i == 7 else "")
                           for i, r in enumerate(rows)), encoding="utf-8")  # a blank line: not a row
    scorer = InProcessScorer(str(tiny_llama_dir), "cpu", None, 512, 8192)
    want = tmp_path / "want.jsonl"
    score_file(inp, want, scorer, progress=False)
    expected = _records(want)

    # JSONL, killed mid-run, resumed
    out = tmp_path / "ray.jsonl"
    proc = _cli(str(inp), "-o", str(out), "--model", str(tiny_llama_dir), "--ray", "--actors", "2",
                "--chunk-rows", "8", "--no-progress")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 40):
        assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = len(out.read_bytes().splitlines())
    print(f"killed after {partial} of {len(rows)} rows journaled")
    assert 40 <= partial < len(rows), partial
    proc = _cli(str(inp), "-o", str(out), "--model", str(tiny_llama_dir), "--ray", "--actors", "2",
                "--no-progress")
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    assert "resumed" in log
    got = _records(out)
    assert len({r["row_index"] for r in got}) == len(got) == len(rows)  # every row exactly once
    _assert_same(got, expected)

    # Parquet in, Parquet out
    pinp = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([r for r in rows if "chosen" in r]), pinp)  # one shape per file
    pwant = tmp_path / "want.parquet"
    score_file(pinp, pwant, scorer, progress=False)
    pout = tmp_path / "ray.parquet"
    proc = _cli(str(pinp), "-o", str(pout), "--model", str(tiny_llama_dir), "--ray", "--no-progress")
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    _assert_same(_records(pout), _records(pwant))


def test_score_ray_flags_are_checked_before_anything_starts(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for args, msg in ((["--actors", "2"], "need --ray"), (["--ray", "--url", "http://127.0.0.1:1"], "--url"),
                      (["--ray", "--actors", "0"], "--actors must be >= 1")):
        proc = _cli(str(inp), "-o", str(tmp_path / "o.jsonl"), *args)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 2 and msg in out, out
