"""``rewardkit score``: TRL row shapes, JSONL/Parquet in and out, in-process vs server (same numbers), summary, and
resumption after SIGKILL (a real subprocess) with no lost or duplicated rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from rewardkit.training.score_cli import (
    InProcessScorer,
    RemoteScorer,
    ScoreInputError,
    read_journal,
    row_items,
    score_file,
)

MSG = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}]


def _pref_rows(n: int) -> list[dict[str, object]]:
    return [{"prompt": f"What is {i} + 1?", "chosen": f"It is {i + 1}.", "rejected": f"It is {i + 2}, surely.",
             "id": f"r{i}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_row_shapes() -> None:
    keys, items = row_items({"prompt": "p", "chosen": "c", "rejected": "r"}, 0)
    assert keys == ["reward_chosen", "reward_rejected"] and items[0] == {"prompt": "p", "response": "c"}
    _, items = row_items({"prompt": [MSG[0]], "chosen": [MSG[1]], "rejected": [MSG[1] | {"content": "x"}]}, 0)
    assert items[0] == {"messages": MSG} and items[1]["messages"][-1]["content"] == "x"
    _, items = row_items({"chosen": "full text a", "rejected": "full text b"}, 0)
    assert items == [{"text": "full text a"}, {"text": "full text b"}]
    assert row_items({"prompt": "p", "completion": "c"}, 0) == (["reward"], [{"prompt": "p", "response": "c"}])
    assert row_items({"prompt": [MSG[0]], "completion": [MSG[1]]}, 0) == (["reward"], [{"messages": MSG}])
    assert row_items({"messages": MSG}, 0) == (["reward"], [{"messages": MSG}])


@pytest.mark.parametrize("row,match", [
    ({"prompt": "p", "chosen": "c"}, "row 7: field 'rejected' is missing"),
    ({"messages": [MSG[0]]}, "row 7: field 'messages' must end with the assistant"),
    ({"prompt": "p", "completion": 3}, "row 7: field 'completion' must be a string"),
    ({"foo": "bar"}, "row 7: no scorable fields"),
])
def test_bad_rows_name_row_and_field(row: dict[str, object], match: str) -> None:
    with pytest.raises(ScoreInputError, match=match):
        row_items(row, 7)


def test_in_process_jsonl_matches_reference_and_summary(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rows = _pref_rows(7) + [{"prompt": "a", "chosen": MSG[1]["content"], "rejected": "b"}]
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    scorer = InProcessScorer(str(tiny_llama_dir), "cpu", None, 2048, 64)  # a small budget: several batches
    summary = score_file(inp, tmp_path / "out.jsonl", scorer, chunk_rows=3, progress=False)
    out = _lines(tmp_path / "out.jsonl")
    assert [r["row_index"] for r in out] == list(range(8)) and out[0]["id"] == "r0"
    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer)
    for r in out:
        exp_c = reference_score(rm, fmt.encode(ScoreItem(prompt=r["prompt"], response=r["chosen"])))  # type: ignore[arg-type]
        exp_r = reference_score(rm, fmt.encode(ScoreItem(prompt=r["prompt"], response=r["rejected"])))  # type: ignore[arg-type]
        assert r["reward_chosen"] == pytest.approx(exp_c, rel=1e-4, abs=1e-5)
        assert r["reward_rejected"] == pytest.approx(exp_r, rel=1e-4, abs=1e-5)
    acc = sum(float(r["reward_chosen"] > r["reward_rejected"]) for r in out) / 8  # type: ignore[operator]
    assert summary["count"] == 8 and summary["accuracy"] == pytest.approx(acc)
    assert "mean" in summary["reward_chosen"] and summary["reward_chosen"]["std"] >= 0


def test_parquet_in_out_and_server_path_agree(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rewardkit.client import RewardClient
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    rows = [{"prompt": f"Q{i}?", "completion": f"Answer number {i}."} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    local = score_file(tmp_path / "in.parquet", tmp_path / "out.parquet",
                       InProcessScorer(str(tiny_llama_dir), "cpu", None, 2048, 8192), chunk_rows=4, progress=False)
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["row_index"] for r in table] == list(range(6)) and table[2]["completion"] == "Answer number 2."
    rm = load_reward_model(tiny_llama_dir)
    with TestClient(create_app(Settings(model=str(tiny_llama_dir)), rm=rm)) as tc:
        # the real client over the app: a transport that hands each request to the in-process TestClient
        def handle(req: httpx.Request) -> httpx.Response:
            r = tc.request(req.method, req.url.path, content=req.content, headers=dict(req.headers))
            return httpx.Response(r.status_code, headers=r.headers, content=r.content)

        forward = httpx.MockTransport(handle)
        client = RewardClient("http://testserver", transport=forward)
        remote = score_file(tmp_path / "in.parquet", tmp_path / "remote.jsonl", RemoteScorer(client), chunk_rows=4,
                            progress=False)
    served = _lines(tmp_path / "remote.jsonl")
    assert [r["reward"] for r in served] == pytest.approx([r["reward"] for r in table], rel=1e-4, abs=1e-5)
    assert remote["count"] == local["count"] == 6 and "accuracy" not in local


def test_read_journal_cuts_torn_tail(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    j.write_bytes(b'{"row_index": 0, "reward": 1.0}\n{"row_index": 1, "reward": 2.0}\n{"row_index": 2, "rew')
    assert read_journal(j) == {0, 1}
    assert j.read_bytes().endswith(b"2.0}\n")
    j.write_bytes(b'{"row_index": 0}\nnot json\n{"row_index": 2}\n')
    assert read_journal(j) == {0} and j.read_bytes() == b'{"row_index": 0}\n'


def test_other_inputs_journal_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", _pref_rows(2))
    _write_jsonl(tmp_path / "out.jsonl", [{"row_index": 5, "reward": 0.0}])
    with pytest.raises(ScoreInputError, match="belongs to another input"):
        score_file(inp, tmp_path / "out.jsonl", lambda items: [0.0] * len(items), progress=False)


def test_sigkill_mid_run_then_resume(tiny_llama_dir: Path, tmp_path: Path) -> None:
    n = 240
    inp = _write_jsonl(tmp_path / "in.jsonl", _pref_rows(n))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "rewardkit.cli", "--log-level", "WARNING", "score", str(inp), "-o", str(out),
           "--model", str(tiny_llama_dir), "--chunk-rows", "2", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"finished or failed before the kill: {proc.stderr.read() if proc.stderr else ''}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.stderr is not None
    proc.stderr.close()
    done_at_kill = out.read_bytes().count(b"\n")
    assert 12 <= done_at_kill < n
    with out.open("ab") as fh:  # what a kill in the middle of a write leaves behind
        fh.write(b'{"prompt": "What is 9')
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["count"] == n
    rows = _lines(out)
    assert sorted(r["row_index"] for r in rows) == list(range(n))  # none lost, none duplicated
    # the resumed file equals a clean run
    clean = score_file(inp, tmp_path / "clean.jsonl", InProcessScorer(str(tiny_llama_dir), "cpu", None, 2048, 8192),
                       chunk_rows=50, progress=False)
    ref = {r["row_index"]: r["reward_chosen"] for r in _lines(tmp_path / "clean.jsonl")}
    got = {r["row_index"]: r["reward_chosen"] for r in rows}
    assert all(got[i] == pytest.approx(ref[i], rel=1e-4, abs=1e-5) for i in range(n))
    assert summary["accuracy"] == pytest.approx(clean["accuracy"])


def test_resume_refuses_a_changed_input_and_says_what_it_resumed(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a rerun with the same -o after editing the input (same row count) reused the old rewards."""
    rows = _pref_rows(4)
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    calls: list[int] = []

    def scorer(items: list[dict[str, object]]) -> list[float]:
        calls.append(len(items))
        return [float(i) for i in range(len(items))]

    score_file(inp, out, scorer, chunk_rows=2, progress=False)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n")  # as if killed after the first chunk
    calls.clear()
    score_file(inp, out, scorer, chunk_rows=2, progress=False)  # same input: resumes
    assert "resumed 2 of 4 rows" in capsys.readouterr().err and calls == [4]  # rows 2-3, two items each
    edited = [dict(r) for r in rows]
    edited[1]["chosen"] = "It is something else."  # same row count, one row changed
    _write_jsonl(inp, edited)
    with pytest.raises(ScoreInputError, match=r"different input: row 1 \(line 2\)"):
        score_file(inp, out, scorer, chunk_rows=2, progress=False)
    old = tmp_path / "old.jsonl"  # a journal from before row hashes
    old.write_text("".join(json.dumps({**r, "row_index": i, "reward_chosen": 0.0, "reward_rejected": 0.0}) + "\n"
                           for i, r in enumerate(edited[:2])))
    with pytest.raises(ScoreInputError, match="without row hashes"):
        score_file(inp, old, scorer, chunk_rows=2, progress=False)


@pytest.mark.parametrize("content, name, match", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl', "in.jsonl", r"row 1 \(line 2\): invalid JSON"),
    ("", "in.jsonl", "has no rows"),
    ("a,b\n", "in.csv", "unsupported input type"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "x"}\n', "in.jsonl", r"row 1 \(line 3\): no scorable"),
])
def test_bad_input_fails_before_the_model_loads(tmp_path: Path, content: str, name: str, match: str) -> None:
    inp = tmp_path / name
    inp.write_text(content)
    # the model path does not exist: had the input been read after the model load, the error would be the load's
    r = subprocess.run([sys.executable, "-m", "rewardkit.cli", "score", str(inp), "-o", str(tmp_path / "o.jsonl"),
                        "--model", "/nonexistent-model-so-loading-would-fail-later"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert __import__("re").search(match, r.stderr), r.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_score_url_with_the_server_down_is_one_line(tmp_path: Path) -> None:
    inp = _write_jsonl(tmp_path / "in.jsonl", _pref_rows(2))
    from tests.helpers import free_port

    r = subprocess.run([sys.executable, "-m", "rewardkit.cli", "score", str(inp), "-o", str(tmp_path / "o.jsonl"),
                        "--url", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "cannot reach the rewardkit server" in r.stderr
    assert "connection refused" in r.stderr
