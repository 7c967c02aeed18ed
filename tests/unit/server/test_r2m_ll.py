"""R2M over a reward model whose read-out has an LL term (the default model's shape: head over a pooled layer plus
``ll_weight`` x the response's mean log-likelihood). The R2M head computes only the head part, so the server adds the
LL term to every R2M reward and carries it with each feedback sample, and GREBT trains on head + LL (issue 22)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.r2m import R2MBatch, R2MConfig, R2MHead, make_optimizer, r2m_update_step
from rewardkit.core.scoring import reference_score
from rewardkit.core.wire import encode_stream
from rewardkit.server.app import create_app
from rewardkit.server.r2m.feedback import FeedbackSample
from rewardkit.server.r2m.protocol import R2MRewardResponse, R2MStatus
from rewardkit.server.settings import Settings

D_P = 12
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def ll_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardkit.core.testing import make_tiny_reward_model

    base = make_tiny_reward_model(tmp_path_factory.mktemp("tied"), arch="llama", layers=3, tie_embeddings=True)
    rm = load_reward_model(base)
    out = tmp_path_factory.mktemp("pooled")
    meta = ckpt.CheckpointMeta(backbone=str(base), model_id="pooled-ll", norm_mean=0.1, norm_std=2.0,
                               readout="mean_response", readout_layer=2, ll_weight=0.7)
    ckpt.save_checkpoint(out, {"weight": rm.head.weight.detach().float()}, meta)
    return out


@pytest.fixture(scope="module")
def client(ll_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    rm = load_reward_model(ll_dir)
    assert rm.meta.ll_weight == 0.7
    settings = Settings(model=str(ll_dir), max_length=64, max_batch_tokens=4096, max_body_bytes=50_000,
                        state_dir=tmp_path_factory.mktemp("state"), r2m_policy_hidden_size=D_P, r2m_d_attn=8,
                        r2m_lr=1e-2, r2m_total_rounds=10, r2m_group_size=4, r2m_max_positions=16)
    with TestClient(create_app(settings, rm=rm)) as c:
        c.rm = rm  # type: ignore[attr-defined]
        yield c


def _frames(group: str, rnd: int = 0, k: int = 4) -> list[tuple[dict, np.ndarray, str]]:
    rng = np.random.default_rng(0)
    return [({"group_id": group, "index": i, "round": rnd, "prompt": f"Question {group}?",
              "response": ["Paris is the capital.", "the the the the", "It is Berlin, I think.", "ok"][i % 4]},
             rng.normal(size=(6, D_P)).astype(np.float32), "float32") for i in range(k)]


def test_r2m_reward_at_round_zero_includes_the_ll_term(client: TestClient) -> None:
    frames = _frames("r0")
    r = client.post("/v1/r2m/rewards", content=encode_stream(frames), headers=OCTET)
    assert r.status_code == 200, r.text
    body = R2MRewardResponse.model_validate(r.json())
    rm = client.rm  # type: ignore[attr-defined]
    fmt = Formatter(rm.tokenizer, max_length=64)
    want = [reference_score(rm, fmt.encode(ScoreItem(prompt=h["prompt"], response=h["response"]), i))
            for i, (h, _, _) in enumerate(frames)]
    # w(0) = 1, W_o = 0: the R2M reward is the RM's reward, LL term included (it was off by ll_weight * ll / std)
    assert body.rewards == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert [x.rm_reward for x in body.results] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_feedback_carries_the_ll_term_into_the_grebt_batch(client: TestClient,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import rewardkit.server.r2m.updater as upd

    seen: list[torch.Tensor | None] = []
    real = upd.r2m_update_step

    def spy(head, opt, batch, **kw):  # type: ignore[no-untyped-def]
        seen.append(batch.offset)
        return real(head, opt, batch, **kw)

    monkeypatch.setattr(upd, "r2m_update_step", spy)
    start = R2MStatus.model_validate(client.get("/v1/r2m/status").json()).active
    frames = _frames("fb", rnd=3)
    r = client.post("/v1/r2m/feedback", content=encode_stream(frames), headers=OCTET)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and R2MStatus.model_validate(client.get("/v1/r2m/status").json()).active == start:
        time.sleep(0.02)
    assert seen and seen[0] is not None and seen[0].shape == (4,)
    rm = client.rm  # type: ignore[attr-defined]
    fmt = Formatter(rm.tokenizer, max_length=64)
    from rewardkit.core.scoring import Scorer

    lls = [Scorer(rm).score_batch([fmt.encode(ScoreItem(prompt=h["prompt"], response=h["response"]))])[0].ll
           for h, _, _ in frames]
    assert seen[0].tolist() == pytest.approx([0.7 * float(x) for x in lls], rel=1e-4, abs=1e-5)


def test_sample_round_trip_keeps_ll_term_and_reads_old_records_as_zero() -> None:
    s = FeedbackSample("g", 1, 2, 4, np.ones(3, np.float32), np.zeros((2, 5), np.float32), ll_term=-1.25)
    f = {k.encode(): v for k, v in s.to_fields().items()}
    assert FeedbackSample.from_fields(f).ll_term == -1.25
    import json

    meta = json.loads(f[b"meta"])
    meta.pop("ll_term")
    f[b"meta"] = json.dumps(meta).encode()
    assert FeedbackSample.from_fields(f).ll_term == 0.0


def test_grebt_pairs_follow_the_offset() -> None:
    """The pseudo-pairs are read from head + offset: an offset that reverses the order of two members reverses the
    direction the head is pushed."""
    torch.manual_seed(0)
    cfg = R2MConfig(d_rm=4, d_policy=3, d_attn=4, total_rounds=10, lr=1e-2)
    score = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    h = torch.tensor([[1.0, 0, 0, 0], [0.0, 0, 0, 0]])  # head rewards 1 and 0
    hid, mask = torch.zeros(2, 2, 3), torch.ones(2, 2, dtype=torch.bool)
    moved = []
    for offset in (None, torch.tensor([0.0, 5.0])):  # the offset makes member 1 the better one
        head = R2MHead.from_scalar_head(score, cfg)
        opt = make_optimizer(head)
        before = head(h, hid, mask, w=1.0).detach()
        r2m_update_step(head, opt, R2MBatch(h, hid, mask, ["g", "g"], offset), w=1.0)
        after = head(h, hid, mask, w=1.0).detach()
        moved.append(float((after[0] - after[1]) - (before[0] - before[1])))
    assert moved[0] > 0 > moved[1]
