"""Read-outs other than the reward token (issue 14's default model): the head over the mean of one layer's states
on the response, plus the backbone's own mean log-likelihood of the response. Checked against a hand computation,
across every Scorer path (batched, padding-free, left padding, KV cache on, ABC dense), through training, the
checkpoint, the loader and the app over HTTP."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.errors import ModelLoadError
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.scoring import Scorer, reference_score

ITEMS = [ScoreItem(prompt="What is 3 + 11?", response="3 + 11 = 14."),
         ScoreItem(prompt="What is 3 + 11?", response="It is 15, I hope this helps!"),
         ScoreItem(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}])]


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rewardkit.core.testing import make_tiny_reward_model

    return make_tiny_reward_model(tmp_path_factory.mktemp("tied"), arch="llama", layers=3, tie_embeddings=True)


def _pooled(base: Path, out: Path, layer: int = 2, ll_weight: float = 0.7) -> Path:
    """A checkpoint over ``base`` whose head reads the mean of hidden_states[layer] and adds ll_weight * LL."""
    from rewardkit.core.testing import make_readout_checkpoint

    return make_readout_checkpoint(base, out, layer=layer, ll_weight=ll_weight)


def _by_hand(rm: RewardModel, item: ScoreItem) -> float:
    enc = Formatter(rm.tokenizer, max_length=128).encode(item)
    ids = torch.tensor([enc.input_ids])
    with torch.no_grad():
        out = rm.model.base_model(input_ids=ids, output_hidden_states=True)
        resp = enc.response_token_indices()
        pooled = out.hidden_states[rm.meta.readout_layer][0, resp].mean(0)
        logits = out.last_hidden_state[0] @ rm.model.get_input_embeddings().weight.T  # (T, V)
        logp = torch.log_softmax(logits, -1)
        ll = torch.stack([logp[k - 1, enc.input_ids[k]] for k in resp]).mean()
        raw = float(rm.head(pooled)) + rm.meta.ll_weight * float(ll)
    return (raw - rm.meta.norm_mean) / rm.meta.norm_std


def _encs(rm: RewardModel) -> list:
    fmt = Formatter(rm.tokenizer, max_length=128)
    return [fmt.encode(it, i) for i, it in enumerate(ITEMS)]


def test_pooled_ll_readout_matches_a_hand_computation_on_every_path(tied_dir: Path, tmp_path: Path) -> None:
    rm = load_reward_model(_pooled(tied_dir, tmp_path / "p"))
    assert rm.meta.readout == "mean_response" and rm.meta.ll_weight == 0.7
    want = [_by_hand(rm, it) for it in ITEMS]
    encs = _encs(rm)
    paths = {"batched": Scorer(rm).score_batch(encs),
             "padding_free": Scorer(rm, padding_free=True).score(encs),
             "left": Scorer(rm, padding_side="left").score(encs),
             "kv_cache": Scorer(rm, prefix_cache_bytes=1 << 20).score(encs + encs)[:3],
             "dense": Scorer(rm).score(encs, dense=[True] * 3, abc_layers=[2])}
    for name, scores in paths.items():
        assert [s.reward for s in scores] == pytest.approx(want, abs=1e-4), name
        assert all(s.ll is not None and s.ll < 0 for s in scores), name
    assert [reference_score(rm, e) for e in encs] == pytest.approx(want, abs=1e-4)
    assert paths["dense"][0].attention is not None  # ABC still gets the reward token's attention row
    # the read-out is part of the head version: the same weights read as a plain token head are another version
    plain = load_reward_model(tied_dir)
    assert torch.equal(plain.head.weight, rm.head.weight) and plain.head_version != rm.head_version


def test_ll_weight_alone_ranks_by_likelihood(tied_dir: Path, tmp_path: Path) -> None:
    """Sanity case with a known answer: a zero head plus the LL term orders items exactly as their mean LL."""
    out = _pooled(tied_dir, tmp_path / "z", ll_weight=1.0)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros_like(load_reward_model(tied_dir).head.weight)}, str(out / ckpt.HEAD_FILE))
    rm = load_reward_model(out)
    s = Scorer(rm).score_batch(_encs(rm))
    assert [x.raw_reward for x in s] == pytest.approx([x.ll for x in s], abs=1e-6)


def test_bad_readouts_are_refused_at_load(tiny_llama_dir: Path, tied_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tie"):  # untied LM head: no log-likelihood to read
        load_reward_model(_pooled(tiny_llama_dir, tmp_path / "u"))
    with pytest.raises(ModelLoadError, match="readout_layer 9"):
        load_reward_model(_pooled(tied_dir, tmp_path / "l", layer=9))
    meta = json.loads((_pooled(tied_dir, tmp_path / "r") / ckpt.META_FILE).read_text())
    assert meta["format_version"] == 2  # older rewardkits refuse it instead of scoring it the old way
    (tmp_path / "r" / ckpt.META_FILE).write_text(json.dumps({**meta, "readout": "max"}))
    with pytest.raises(ModelLoadError, match="readout must be one of"):
        load_reward_model(tmp_path / "r")
    plain = ckpt.CheckpointMeta(backbone="x")
    assert json.loads(plain.to_json())["format_version"] == 1  # plain checkpoints stay readable by older versions


def test_train_bt_mean_response_with_ll_round_trips_over_http(tied_dir: Path, tmp_path: Path) -> None:
    from rewardkit.training.bt import train_bt
    from rewardkit.training.config import BTConfig

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "chosen": f"{i} + 2 = {i + 2}.",
                                        "rejected": f"{i} + 2 = {i + 3}. Hope this helps!"}) + "\n"
                            for i in range(12)), encoding="utf-8")
    cache = tmp_path / "cache"
    cfg = BTConfig(model=str(tied_dir), train_file=str(data), output_dir=str(tmp_path / "m"), device="cpu",
                   num_epochs=5, batch_size=6, learning_rate=5e-2, disable_tqdm=True, max_length=64,
                   readout="mean_response", readout_layer=2, ll_feature=True, feature_cache_dir=str(cache))
    res = train_bt(cfg)
    assert res.rm.meta.ll_weight != 0.0 and res.metrics["train_accuracy"] > 0.5
    loaded = load_reward_model(tmp_path / "m")
    assert (loaded.meta.readout, loaded.meta.readout_layer) == ("mean_response", 2)
    assert loaded.meta.ll_weight == pytest.approx(res.rm.meta.ll_weight)
    assert loaded.head_version == res.rm.head_version
    encs = _encs(loaded)
    ours = [s.reward for s in Scorer(res.rm).score_batch(encs)]
    assert [s.reward for s in Scorer(loaded).score_batch(encs)] == pytest.approx(ours, rel=1e-4, abs=1e-5)
    assert [_by_hand(loaded, it) for it in ITEMS] == pytest.approx(ours, abs=1e-4)
    # the feature cache key covers the read-out: a plain run over the same pairs does not reuse these features
    n_cached = len(list(cache.glob("features-*.safetensors")))
    train_bt(BTConfig(model=str(tied_dir), train_file=str(data), output_dir=str(tmp_path / "t"), device="cpu",
                      num_epochs=1, disable_tqdm=True, max_length=64, feature_cache_dir=str(cache)))
    assert len(list(cache.glob("features-*.safetensors"))) == n_cached + 1
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    body = {"items": [{"prompt": it.prompt, "response": it.response} if it.prompt else {"messages": it.messages}
                      for it in ITEMS]}
    with TestClient(create_app(Settings(model=str(tmp_path / "m"), max_length=128))) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = client.post("/v1/rewards", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["rewards"] == pytest.approx(ours, rel=1e-4, abs=1e-5)
        assert r.headers["x-rewardkit-head-version"] == res.rm.head_version


def test_train_rrm_frozen_mean_response_with_ll(tied_dir: Path, tmp_path: Path) -> None:
    """RRM frozen on the default model's read-out: the LL column is a feature of every slot (the filter's baseline
    and the RRM head read it), its weight is saved as ll_weight, and the served rewards are the trained ones."""
    from rewardkit.training.rrm import RRMConfig, train_rrm

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "chosen": f"{i} + 2 = {i + 2}.",
                                        "rejected": f"{i} + 2 = {i + 3}. Hope this helps!"}) + "\n"
                            for i in range(8)), encoding="utf-8")
    cfg = RRMConfig(model=str(tied_dir), train_file=str(data), output_dir=str(tmp_path / "m"), device="cpu",
                    num_epochs=5, batch_size=8, learning_rate=5e-2, disable_tqdm=True, max_length=64, l2=0.1,
                    readout="mean_response", readout_layer=2, ll_feature=True, augment_ratio=1.0, seed=1)
    res = train_rrm(cfg)
    assert res.rm.meta.ll_weight != 0.0
    assert res.metrics["train_comparisons"] == 8 + sum(res.metrics["augmentation"]["used"].values())
    loaded = load_reward_model(tmp_path / "m")
    assert (loaded.meta.readout, loaded.meta.readout_layer) == ("mean_response", 2)
    assert loaded.meta.ll_weight == pytest.approx(res.rm.meta.ll_weight)
    encs = _encs(loaded)
    ours = [s.reward for s in Scorer(res.rm).score_batch(encs)]
    assert [_by_hand(loaded, it) for it in ITEMS] == pytest.approx(ours, abs=1e-4)
    # ll_weight is a real part of the served reward: zeroing it changes the scores
    loaded.meta.ll_weight = 0.0
    assert [s.reward for s in Scorer(loaded).score_batch(encs)] != pytest.approx(ours, abs=1e-4)


def test_readout_flags_are_validated() -> None:
    from rewardkit.training.config import BTConfig, IdRMConfig, RRMConfig

    with pytest.raises(ValueError, match="frozen"):
        BTConfig(train_file="x", output_dir="y", mode="lora", readout="mean_response").validate()
    with pytest.raises(ValueError, match="readout_layer"):
        BTConfig(train_file="x", output_dir="y", readout_layer=3).validate()
    RRMConfig(train_file="x", output_dir="y", ll_feature=True, readout="mean_response").validate()  # frozen: fine
    with pytest.raises(ValueError, match="frozen"):
        RRMConfig(train_file="x", output_dir="y", mode="lora", ll_feature=True).validate()
    with pytest.raises(ValueError, match="frozen|train bt"):
        IdRMConfig(train_file="x", output_dir="y", readout="mean_response").validate()


def test_lora_from_a_pooled_checkpoint_is_refused_with_the_way_out(tied_dir: Path, tmp_path: Path) -> None:
    from rewardkit.training.bt import train_bt
    from rewardkit.training.config import BTConfig

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="token read-out"):
        train_bt(BTConfig(model=str(_pooled(tied_dir, tmp_path / "p")), train_file=str(data), mode="lora",
                          output_dir=str(tmp_path / "o"), device="cpu", disable_tqdm=True))


def test_cli_says_the_set_up_problem_in_one_line(tied_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from rewardkit.cli import main

    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        main(["train", "bt", "--model", str(_pooled(tied_dir, tmp_path / "p")), "--mode", "lora", "--train-file",
              str(data), "--output-dir", str(tmp_path / "o"), "--device", "cpu", "--disable-tqdm"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: model:" in err and "token read-out" in err and "Traceback" not in err
