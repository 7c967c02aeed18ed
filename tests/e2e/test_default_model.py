"""End to end on the real embedded default (SmolLM2-135M-Instruct GGUF + the committed head), over HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rewardkit.client import RewardClient
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from tests.helpers import ServerProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAIRS = [  # (prompt, correct, wrong): simple checkable facts the backbone knows
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France is Berlin."),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "The capital of Italy is Madrid."),
    ("What is 7 + 5?", "7 + 5 = 12.", "7 + 5 = 15."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo.", "The capital of Japan is Cairo."),
    ("What is 9 + 10?", "9 + 10 = 19.", "9 + 10 = 17."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid.", "The capital of Spain is Oslo."),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with ServerProcess(None, tmp_path_factory.mktemp("e2e"), "--max-length", "512") as srv:
        yield srv


def test_default_model_parity_and_card(server: ServerProcess) -> None:
    items = [ScoreItem(prompt=p, response=r) for p, c, w in PAIRS for r in (c, w)]
    with RewardClient(server.url) as rk:
        got = rk.score(prompts=[i.prompt for i in items], responses=[i.response for i in items])
        card = rk.models()[0]
    rm = load_reward_model(None)
    fmt = Formatter(rm.tokenizer, max_length=512)
    want = [reference_score(rm, fmt.encode(it, k)) for k, it in enumerate(items)]
    # The server batches (and prefix-packs) these 12 items as its scheduler groups them, the reference runs each alone:
    # fp32 sums in another order. Seen: up to 1.8e-5 apart on rewards of magnitude ~0.2 (one run in many). A wrong
    # read position, mask or padding moves a reward by 1e-2 or more, so 5e-5 still catches every such bug.
    assert got == pytest.approx(want, rel=1e-4, abs=5e-5)
    assert card.id == rm.model_id and card.trained == rm.meta.trained
    if not rm.meta.trained:
        assert "UNTRAINED" in card.description
    else:  # the committed head must prefer the correct answer on most simple facts
        wins = sum(got[2 * k] > got[2 * k + 1] for k in range(len(PAIRS)))
        assert wins >= 4, (wins, got)


def test_default_head_is_committed_and_small() -> None:
    from rewardkit.core.loading import DEFAULT_HEAD_DIR

    if not DEFAULT_HEAD_DIR.exists():
        pytest.skip("no default head committed yet")
    size = sum(p.stat().st_size for p in Path(DEFAULT_HEAD_DIR).rglob("*") if p.is_file())
    assert size <= 5 * 1024 * 1024


def test_start_up_says_which_head_and_nothing_misleading(server: ServerProcess) -> None:
    """A new user read transformers' "score.weight MISSING ... newly initialized", the GGUF progress bar and
    `past_key_values` FutureWarnings as "the model is untrained". Run traffic through every path, then read the log."""
    with RewardClient(server.url) as rk:
        rk.score(prompts=["hi", "hi"], responses=["hello", "hey"])  # a shared prompt: the prefix (KV cache) path
        rk.score_dense(prompts=["hi"], responses=["hello"])
    log = server.logs()
    for noise in ("MISSING", "newly initialized", "Consider training", "de-quantizing", "deprecated",
                  "FutureWarning", "Traceback"):
        assert noise not in log, noise
    ready = [line for line in log.splitlines() if "rewardkit.server.app ready" in line]
    assert len(ready) == 1 and "head=trained" in ready[0]
