"""The four commands as processes: ``testbed make`` -> ``train bt`` -> ``serve`` -> the client (and ``score --url``,
``eval``); the served scores equal the trainer's own model's (tiny Llama backbone, frozen and LoRA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rewardkit.client import RewardClient
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import Scorer
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
PROMPTS = ["What is 12 + 30?", "What is the capital of France?", "Name exactly three fruits."]
RESPONSES = ["12 + 30 = 42.", "The capital of France is Paris. I hope this helps!", "- apple\n- pear\n- plum"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "rewardkit.cli", "--log-level", "WARNING", *args], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tb")
    _cli("testbed", "make", "--out", str(out), "--n-train", "64", "--n-val", "16", "--n-test", "16")
    return out


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_trained_checkpoint_served_gives_the_same_scores(tiny_llama_dir: Path, testbed: Path, tmp_path: Path,
                                                         mode: str) -> None:
    ckpt = tmp_path / "ckpt"
    _cli("train", "bt", "--model", str(tiny_llama_dir), "--train-file", str(testbed), "--output-dir", str(ckpt),
         "--mode", mode, "--num-epochs", "1", "--batch-size", "8", "--max-length", "512", "--device", "cpu",
         "--disable-tqdm", "--learning-rate", "1e-2")
    meta = json.loads((ckpt / "rewardkit.json").read_text())
    assert meta["provenance"]["command"].startswith("rewardkit ") and meta["provenance"]["mode"] == mode
    rm = load_reward_model(ckpt)  # what the trainer wrote, loaded as the server loads it
    assert rm.model_id == "ckpt" and rm.meta.trained
    fmt = Formatter(rm.tokenizer, max_length=512)
    expected = [s.reward for s in Scorer(rm).score_batch(
        [fmt.encode(ScoreItem(prompt=p, response=r), i) for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES, strict=True))])]
    with ServerProcess(ckpt, tmp_path, "--max-length", "512") as srv:
        with RewardClient(srv.url) as client:
            served = client.score(prompts=PROMPTS, responses=RESPONSES)
            assert client.models()[0].id == "ckpt"
        assert served == pytest.approx(expected, rel=1e-4, abs=1e-5)
        if mode == "frozen":
            _cli("score", str(testbed / "test.jsonl"), "-o", str(tmp_path / "scored.jsonl"), "--url", srv.url,
                 "--no-progress")
    if mode == "frozen":
        rows = [json.loads(x) for x in (tmp_path / "scored.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and all("reward_chosen" in r for r in rows)
        res = _cli("eval", "--model", str(ckpt), "--data", str(testbed), "--splits", "test", "--probe", "0,0.5",
                   "--json", str(tmp_path / "eval.json"), "--no-progress")
        summary = json.loads((tmp_path / "eval.json").read_text())["results"][0]
        # eval and the server-scored file agree on the accuracy of the same pairs
        acc = sum(1.0 if r["reward_chosen"] > r["reward_rejected"] else 0.0 for r in rows) / len(rows)
        assert summary["accuracy"] == pytest.approx(acc) and "test" in res.stdout
