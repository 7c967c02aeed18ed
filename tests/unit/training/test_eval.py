"""Evaluation: ECE, masking, grouping by family/artifact, the feature-cache path, and the CLI's table + JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import reference_score
from rewardkit.training.data import load_records
from rewardkit.training.eval import (
    data_files,
    evaluate,
    expected_calibration_error,
    format_table,
    mask_item,
)


def _art(present: bool, agrees: bool) -> dict[str, object]:
    return {"present": present, "on": ("chosen" if agrees else "rejected") if present else "none", "agrees": agrees}


def _rows() -> list[dict[str, object]]:
    rows = []
    for i in range(10):
        rows.append({"prompt": f"What is {i} + {i + 7}?", "chosen": f"It is {2 * i + 7}.",
                     "rejected": f"It is {2 * i + 8}, I hope this helps!",
                     "task": {"family": "arithmetic" if i < 6 else "facts"},
                     "artifacts": {"boilerplate": _art(i % 3 != 0, i % 3 == 1)}})
    return rows


def test_ece_closed_forms() -> None:
    assert expected_calibration_error(torch.full((8,), 0.9)) == pytest.approx(0.1, abs=1e-6)  # right, 90% sure
    # half right at 70% confidence on each side: accuracy 0.5 vs confidence 0.7
    p = torch.tensor([0.7, 0.7, 0.3, 0.3])
    assert expected_calibration_error(p) == pytest.approx(0.2, abs=1e-6)
    assert expected_calibration_error(torch.tensor([1.0, 1.0])) == pytest.approx(0.0, abs=1e-6)


def test_mask_item_modes(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    enc = Formatter(rm.tokenizer).encode(ScoreItem(prompt="What is 2 + 2?", response="It is four."))
    n = enc.num_tokens
    rep = mask_item(enc, 0.4, rm.pad_token_id, "replace")
    k = int(0.4 * n)
    assert rep.num_tokens == n and rep.input_ids[:k] == (rm.pad_token_id,) * k and rep.input_ids[k:] == enc.input_ids[k:]
    drop = mask_item(enc, 0.4, rm.pad_token_id, "drop")
    assert drop.input_ids == enc.input_ids[k:] and len(drop.offsets) == n - k
    assert mask_item(enc, 0.0, rm.pad_token_id) is enc
    assert mask_item(enc, 0.999, rm.pad_token_id, "drop").input_ids[-1] == enc.input_ids[-1]  # reward token kept
    with pytest.raises(ValueError, match="probe mode"):
        mask_item(enc, 0.5, 0, "zero")


def test_evaluate_groups_accuracy_and_probe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    pairs, _ = load_records(_rows())
    rep = evaluate(rm, pairs, name="t", probe_fractions=(0.0, 0.6), progress=False)
    s = rep.summary()
    fmt = Formatter(rm.tokenizer, max_length=2048)
    diffs = [reference_score(rm, fmt.encode(ScoreItem(prompt=p.prompt, response=p.chosen)))  # type: ignore[arg-type]
             - reference_score(rm, fmt.encode(ScoreItem(prompt=p.prompt, response=p.rejected)))  # type: ignore[arg-type]
             for p in pairs]
    assert s["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
    assert s["mean_margin"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-4, abs=1e-5)
    assert {k: v["pairs"] for k, v in s["per_family"].items()} == {"arithmetic": 6, "facts": 4}
    assert {k: v["pairs"] for k, v in s["per_artifact"].items()} == {
        "boilerplate:absent": 4, "boilerplate:agrees": 3, "boilerplate:disagrees": 3}
    arith = [d for d, p in zip(diffs, pairs, strict=True) if p.meta["task"]["family"] == "arithmetic"]
    assert s["per_family"]["arithmetic"]["accuracy"] == pytest.approx(sum(d > 0 for d in arith) / 6)
    probe = s["masking_probe"]["accuracy"]
    assert probe["0.0"] == s["accuracy"] and set(probe) == {"0.0", "0.6"}
    assert 0.0 <= s["ece"] <= 1.0
    table = format_table([s])
    assert "arithmetic" in table and "boilerplate:agrees" in table


def test_masking_changes_scores_and_feature_cache_matches(tiny_llama_dir: Path, tmp_path: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    pairs, _ = load_records(_rows())
    plain = evaluate(rm, pairs, probe_fractions=(), progress=False)
    cached = evaluate(rm, pairs, probe_fractions=(0.0, 0.8), progress=False, feature_cache_dir=tmp_path / "fc")
    assert torch.allclose(plain.r_chosen, cached.r_chosen, rtol=1e-4, atol=1e-5)
    assert torch.allclose(plain.raw_rejected, cached.raw_rejected, rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "fc").glob("*.safetensors"))) == 2  # unmasked + 80% masked
    masked = evaluate(rm, pairs, probe_fractions=(0.8,), progress=False, feature_cache_dir=tmp_path / "fc")
    assert masked.probe["0.8"] == cached.probe["0.8"]  # served from the cache
    again = evaluate(rm, pairs, probe_fractions=(0.8,), progress=False)
    assert again.probe["0.8"] == pytest.approx(cached.probe["0.8"])


def test_data_files_and_cli_json(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "tb"
    d.mkdir()
    for split in ("train", "test", "test_clean"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    assert [n for n, _ in data_files(d)] == ["test", "test_clean"]
    with pytest.raises(ValueError, match="does not exist"):
        data_files(tmp_path / "nope.jsonl")
    from rewardkit.cli import main

    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as ei:
        main(["eval", "--model", str(tiny_llama_dir), "--data", str(d), "--probe", "0,0.4", "--json", str(out),
              "--no-progress"])
    assert ei.value.code == 0
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["results"]] == ["test", "test_clean"]
    assert payload["results"][0]["masking_probe"]["mode"] == "replace"
    assert "test_clean" in capsys.readouterr().out


def test_content_probe_never_hides_the_chat_template(tiny_llama_dir: Path) -> None:
    """The old probe hid the first k% of the formatted text: the system prompt and role markers first."""
    from rewardkit.training.eval import content_spans, probe_tokens
    from rewardkit.training.features import encode_pairs

    rm = load_reward_model(tiny_llama_dir)
    pairs, _ = load_records([{"prompt": "What is the capital of France?", "chosen": "Paris is the capital.",
                              "rejected": "Rome is the capital."}])
    ep = encode_pairs(pairs, Formatter(rm.tokenizer))[0][0]
    enc = ep.chosen
    assert "<|im_start|>" in enc.text  # the tiny tokenizer has a chat template
    spans = content_spans(enc, pairs[0].prompt)
    assert [enc.text[a:b] for a, b in spans] == ["What is the capital of France?", "Paris is the capital."]
    content = probe_tokens(enc, pairs[0], "chosen", "content")
    assert content is not None and content
    hidden = mask_item(enc, 0.999, rm.pad_token_id, "replace", content)
    special = {rm.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")}
    for i, (a, b) in enumerate(hidden.input_ids and zip(enc.input_ids, hidden.input_ids, strict=True)):
        if a in special:
            assert b == a, f"template token {i} was hidden"
        if i in content[:-1] and i != enc.num_tokens - 1:
            assert b == rm.pad_token_id
    # the formatted scope (old behaviour) does hide the template's first tokens
    old = mask_item(enc, 0.2, rm.pad_token_id, "replace", probe_tokens(enc, pairs[0], "chosen", "formatted"))
    assert old.input_ids[0] == rm.pad_token_id and enc.input_ids[0] in special


def test_masking_the_answer_span_drives_accuracy_to_chance(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Sanity case of the probe: testbed clean pairs differ only in the answer span; with it hidden (drop mode),
    chosen and rejected are the same token sequence, so every pair ties and accuracy is exactly chance."""
    from rewardkit.training.data import load_preferences
    from rewardkit.training.testbed.build import make_testbed

    make_testbed(tmp_path / "tb", seed=3, n_train=4, n_val=4, n_test=24)
    pairs, _ = load_preferences(tmp_path / "tb" / "test_clean.jsonl")
    rm = load_reward_model(tiny_llama_dir)
    s = evaluate(rm, pairs, name="clean", probe_fractions=(0.0, 1.0), probe_mode="drop", probe_scope="answer",
                 progress=False).summary()
    assert s["masking_probe"]["scope"] == "answer"
    assert s["masking_probe"]["accuracy"]["1.0"] == 0.5
    assert s["masking_probe"]["accuracy"]["0.0"] == s["accuracy"]
    # the same model without the mask does see a difference on (nearly) every pair: no ties
    assert s["mean_margin"] != 0.0
    with pytest.raises(ValueError, match="answer_span"):
        evaluate(rm, load_records(_rows())[0], probe_fractions=(0.0, 0.5), probe_scope="answer", progress=False)


def test_relevance_accuracy_by_hand_and_its_sanity_case(tiny_llama_dir: Path) -> None:
    from rewardkit.core.scoring import Scorer
    from rewardkit.training.data import PreferencePair
    from rewardkit.training.eval import evaluate
    from rewardkit.training.rrm import draw_partners

    rm = load_reward_model(tiny_llama_dir)
    pairs = [PreferencePair(prompt=f"What is {i} + 1?", chosen=f"{i} + 1 = {i + 1}.", rejected=f"{i + 2}.")
             for i in range(9)]
    rep = evaluate(rm, pairs, probe_fractions=(), relevance=True, progress=False).summary()
    partner, _ = draw_partners(len(pairs), seed=0)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    scorer = Scorer(rm, prefix_sharing=False)
    wins = 0.0
    for i, p in enumerate(pairs):
        own, other = scorer.score_batch([fmt.encode(ScoreItem(prompt=p.prompt, response=p.chosen)),
                                         fmt.encode(ScoreItem(prompt=p.prompt, response=pairs[partner[i]].chosen))])
        wins += 1.0 if own.reward > other.reward else 0.5 if own.reward == other.reward else 0.0
    assert rep["relevance"]["pairs"] == 9 and rep["relevance"]["accuracy"] == pytest.approx(wins / 9)
    assert rep["relevance"]["max_abs_margin"] > 1e-3  # different texts score differently
    # sanity: every pair's chosen response is the same text, so own and borrowed are the same text on the same
    # prompt: no margin at all (up to fp32 rounding between batch rows)
    same = [PreferencePair(prompt=p.prompt, chosen="The answer.", rejected=p.rejected) for p in pairs]
    assert evaluate(rm, same, probe_fractions=(), relevance=True, progress=False).summary()["relevance"][
        "max_abs_margin"] < 1e-5
    assert "relevance" not in evaluate(rm, pairs, probe_fractions=(), progress=False).summary()


def test_feature_cache_path_adds_the_ll_term_of_a_pooled_model(tmp_path: Path) -> None:
    from rewardkit.core import checkpoint as ckpt
    from rewardkit.core.testing import make_tiny_reward_model
    from rewardkit.training.data import PreferencePair
    from rewardkit.training.eval import evaluate

    base = make_tiny_reward_model(tmp_path / "tied", tie_embeddings=True)
    head = load_reward_model(base).head.weight.detach().float()
    ckpt.save_checkpoint(tmp_path / "p", {"weight": head}, ckpt.CheckpointMeta(
        backbone=str(base), readout="mean_response", readout_layer=1, ll_weight=2.0))
    rm = load_reward_model(tmp_path / "p")
    pairs = [PreferencePair(prompt=f"Q{i}?", chosen=f"A {i}.", rejected=f"B {i} b.") for i in range(5)]
    plain = evaluate(rm, pairs, probe_fractions=(), progress=False)
    cached = evaluate(rm, pairs, probe_fractions=(), progress=False, feature_cache_dir=tmp_path / "fc")
    assert torch.allclose(plain.raw_chosen, cached.raw_chosen, atol=1e-4)
    assert torch.allclose(plain.raw_rejected, cached.raw_rejected, atol=1e-4)
