"""Id-RM: character-offset mapping between the MiniLM WordPiece and a byte-level BPE tokenizer, teacher distributions,
the attention KL and its gradient into the student's q/k projections, and an end-to-end run on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.testing import make_tokenizer
from rewardkit.training.idrm import (
    IdRMConfig,
    StudentTarget,
    Teacher,
    align_layer_indices,
    attention_kl,
    idrm_step_loss,
    minilm_dir,
    project_char_mass,
    student_targets,
    teacher_char_mass,
    token_mass_to_chars,
    train_idrm,
)
from rewardkit.training.loop import RewardForward, setup_trainable

TEXT = "The capital of France is Paris, not Berlin."


@pytest.fixture(scope="module")
def wordpiece():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, wordpiece) -> Path:  # type: ignore[no-untyped-def]
    """A tiny random BERT with the real MiniLM WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(wordpiece), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(out)
    wordpiece.save_pretrained(out)
    return out


def _offsets(tok, text: str) -> tuple[list[str], list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return tok.convert_ids_to_tokens(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def test_wordpiece_to_bpe_mass_lands_on_the_same_characters(wordpiece) -> None:  # type: ignore[no-untyped-def]
    wp_tokens, wp_off = _offsets(wordpiece, TEXT)
    bpe = make_tokenizer()
    bpe_tokens, bpe_off = _offsets(bpe, TEXT)
    assert wp_tokens != bpe_tokens  # two genuinely different segmentations
    paris = wp_tokens.index("paris")  # uncased WordPiece; offsets still point into the original text
    mass = np.zeros(len(wp_tokens))
    mass[paris] = 1.0
    chars = token_mass_to_chars(mass, wp_off, len(TEXT))
    assert chars.sum() == pytest.approx(1.0)
    s, e = TEXT.index("Paris"), TEXT.index("Paris") + 5
    assert chars[s:e].sum() == pytest.approx(1.0)
    dist = project_char_mass(chars, bpe_off)
    assert dist.sum() == pytest.approx(1.0)
    hit = [i for i, (a, b) in enumerate(bpe_off) if a < e and b > s]
    assert dist[hit].sum() == pytest.approx(1.0)  # every bit of mass sits on BPE tokens covering "Paris"
    miss = [i for i in range(len(bpe_off)) if i not in hit]
    assert np.all(dist[miss] == 0)


def test_uniform_mass_round_trips_proportional_to_characters(wordpiece) -> None:  # type: ignore[no-untyped-def]
    _, wp_off = _offsets(wordpiece, TEXT)
    chars = token_mass_to_chars(np.full(len(wp_off), 1.0 / len(wp_off)), wp_off, len(TEXT))
    bpe_off = _offsets(make_tokenizer(), TEXT)[1]
    dist = project_char_mass(chars, bpe_off)
    assert dist.sum() == pytest.approx(1.0)
    # a token that covers no teacher-covered character (a lone space) gets nothing
    assert all(dist[i] == 0 for i, (a, b) in enumerate(bpe_off) if TEXT[a:b].strip() == "")


def test_overlapping_student_tokens_split_a_character() -> None:
    # byte-level BPE can give two tokens the same multi-byte character: its mass is split, the total stays 1
    dist = project_char_mass(np.array([0.5, 0.5]), [(0, 1), (0, 1), (1, 2)])
    assert dist.tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert project_char_mass(np.zeros(3), [(0, 3)]).tolist() == [0.0]


def test_student_targets_on_a_formatted_chat_item(wordpiece) -> None:  # type: ignore[no-untyped-def]
    bpe = make_tokenizer()
    item = Formatter(bpe).encode(ScoreItem(prompt="What is the capital of France?", response=TEXT))
    assert item.response == TEXT and item.response_start > 0
    wp_tokens, wp_off = _offsets(wordpiece, TEXT)
    mass = np.zeros(len(wp_tokens))
    mass[wp_tokens.index("berlin")] = 1.0
    keep, dist = student_targets(item, token_mass_to_chars(mass, wp_off, len(TEXT)))
    assert dist.sum() == pytest.approx(1.0)
    top = keep[int(dist.argmax())]
    s, e = item.offsets[top]
    assert "Berlin".startswith(item.text[s:e].strip()) or item.text[s:e].strip() in "Berlin"
    with pytest.raises(ValueError, match="characters"):
        student_targets(item, np.zeros(3))


def test_teacher_distribution_includes_cross_response_attention(tiny_teacher_dir: Path) -> None:
    teacher = Teacher(tiny_teacher_dir)
    a, b = "Paris is the capital.", "Berlin is the capital of France, I think."
    ids, types, offs, seg = teacher.build("What is the capital of France?", a, b)
    assert len(ids) == len(types) == len(offs) == len(seg)
    _, att = teacher([(ids, types, offs, seg)], attentions=True)
    assert att is not None
    ma, mb = teacher_char_mass(att[0], seg, offs, len(a), len(b))
    assert ma.sum() == pytest.approx(1.0) and mb.sum() == pytest.approx(1.0)
    # the cross term matters: a uniform [CLS] row would give a different distribution if B's rows were ignored
    only_cls = att[0].clone()
    seg_t = torch.tensor(seg)
    only_cls[seg_t == 2] = 0.0  # B's queries attend nowhere
    ma2, _ = teacher_char_mass(only_cls, seg, offs, len(a), len(b))
    assert not np.allclose(ma, ma2)


def test_teacher_truncation_keeps_response_ends(tiny_teacher_dir: Path) -> None:
    teacher = Teacher(tiny_teacher_dir, max_length=40)
    long_a = " ".join(["filler"] * 60) + " answer"
    ids, _, offs, seg = teacher.build("prompt " * 30, long_a, "short reply")
    assert len(ids) <= 40
    a_off = [o for o, s in zip(offs, seg, strict=True) if s == 1]
    assert a_off[-1][1] == len(long_a)  # the end of A survived


def test_attention_kl_zero_when_matching_and_positive_otherwise() -> None:
    rows = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.1, 0.6, 0.3, 0.0]])
    tgt = [([1, 2], np.array([0.4, 0.6])), ([1, 2], np.array([2 / 3, 1 / 3]))]
    kl = attention_kl(rows, tgt)
    # item 0: q = (0.4, 0.6) equals p -> 0; item 1: q = (2/3, 1/3) equals p -> 0
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
    kl2 = attention_kl(rows, [([1, 2], np.array([0.9, 0.1])), ([], np.zeros(0))])
    expected = 0.9 * np.log(0.9 / 0.4) + 0.1 * np.log(0.1 / 0.6)
    assert float(kl2) == pytest.approx(expected, rel=1e-5)  # the empty item is skipped, not averaged in


def test_kl_gradient_reaches_q_and_k_of_the_last_k_layers(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)  # 2 layers, abc_sdpa attention
    cfg = IdRMConfig(model=str(tiny_llama_dir), train_file="x", output_dir="y", lora_target_modules="q_proj,k_proj")
    layers = align_layer_indices(rm, 1)
    assert layers == [1]
    setup_trainable(cfg, rm, layers)
    fmt = Formatter(rm.tokenizer, max_length=64)
    items = [fmt.encode(ScoreItem(prompt="What is 2 + 2?", response=r)) for r in ("2 + 2 = 4.", "It is 5, I think.")]
    targets = []
    for it in items:  # all teacher mass on the first response token
        keep = it.response_token_indices()
        d = np.zeros(len(keep))
        d[0] = 1.0
        targets.append(StudentTarget(keep, d, np.zeros((len(keep), len(keep))), np.zeros(len(keep)), 0.0,
                                     np.zeros(len(keep), dtype=bool)))
    fwd = RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule)
    lora = {n: p for n, p in rm.model.named_parameters() if "lora_" in n}
    assert lora and all(".layers.1." in n for n in lora)  # only the last K layers carry adapters
    opt = torch.optim.SGD(lora.values(), lr=0.1)
    before = {n: p.detach().clone() for n, p in lora.items()}
    _, _, kl, _, _ = idrm_step_loss(fwd, rm, items, targets, layers, eta=1.0)
    kl.backward()  # the KL alone: its gradient must reach the attention projections
    for proj in ("q_proj", "k_proj"):
        grads = [p.grad for n, p in lora.items() if proj in n and "lora_B" in n]
        assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads), proj
    opt.step()
    changed = {n for n, p in lora.items() if not torch.equal(p, before[n])}
    assert any("q_proj" in n for n in changed) and any("k_proj" in n for n in changed)
    # and a step lowers the KL
    opt.zero_grad()
    _, _, kl_after, _, _ = idrm_step_loss(fwd, rm, items, targets, layers, eta=1.0)
    assert float(kl_after.detach()) < float(kl.detach())


def _rows(n: int = 12) -> list[dict[str, object]]:
    return [{"prompt": f"What is {3 + i} + {11 + i}?", "chosen": f"{3 + i} + {11 + i} = {14 + 2 * i}.",
             "rejected": f"{3 + i} + {11 + i} = {15 + 2 * i}. I hope this helps!"} for i in range(n)]


def test_train_idrm_end_to_end_checkpoint_and_teacher_cache(tiny_llama_dir: Path, tiny_teacher_dir: Path,
                                                            tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    base = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=2, batch_size=4,
                learning_rate=1e-2, logging_steps=1, disable_tqdm=True, max_length=64, seed=1, eta=1.0,
                align_layers=1, teacher_model=str(tiny_teacher_dir), teacher_epochs=1, teacher_batch_size=8,
                teacher_cache_dir=str(tmp_path / "cache"), teacher_val_pairs=0)
    res = train_idrm(IdRMConfig(output_dir=str(tmp_path / "a"), **base), command="test")  # type: ignore[arg-type]
    assert res.metrics["teacher"]["cache_hit"] is False and res.metrics["teacher"]["teacher_finetuned"] is True
    assert res.metrics["train_kl_last"] > 0 and res.steps == 6
    assert list((tmp_path / "cache").glob("teacher-*.safetensors"))
    loaded = load_reward_model(tmp_path / "a")  # adapter merged at load: the server's loader, unchanged
    assert loaded.meta.provenance["trainer"] == "idrm" and loaded.meta.provenance["align_layers"] == [1]
    fmt = Formatter(loaded.tokenizer, max_length=64)
    from rewardkit.core.scoring import Scorer

    item = fmt.encode(ScoreItem(prompt="What is 3 + 11?", response="3 + 11 = 14."))
    trained = Scorer(res.rm).score_batch([item])[0].raw_reward
    assert Scorer(loaded).score_batch([item])[0].raw_reward == pytest.approx(trained, abs=1e-5)
    res2 = train_idrm(IdRMConfig(output_dir=str(tmp_path / "b"), **base), command="test")  # type: ignore[arg-type]
    assert res2.metrics["teacher"]["cache_hit"] is True
    assert res2.metrics["train_kl_last"] == pytest.approx(res.metrics["train_kl_last"], rel=1e-4)


def test_train_idrm_full_mode_and_lora_on_every_layer(tiny_llama_dir: Path, tiny_teacher_dir: Path,
                                                      tmp_path: Path) -> None:
    """Id-RM through the shared loop in its two other placements: every weight (full), and LoRA on all layers."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    base = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=1, batch_size=4,
                learning_rate=1e-3, disable_tqdm=True, max_length=64, seed=1, eta=1.0, align_layers=1,
                teacher_model=str(tiny_teacher_dir), teacher_epochs=0, teacher_cache_dir=str(tmp_path / "cache"),
                teacher_val_pairs=0)
    before = load_reward_model(tiny_llama_dir)
    full = train_idrm(IdRMConfig(output_dir=str(tmp_path / "f"), mode="full", **base))  # type: ignore[arg-type]
    assert (tmp_path / "f" / "backbone" / "config.json").is_file()
    moved = [n for (n, p), q in zip(full.rm.model.named_parameters(), before.model.parameters(), strict=True)
             if not torch.equal(p, q)]
    assert any(".layers.0." in n for n in moved)  # full mode trains below the aligned layer too
    loaded = load_reward_model(tmp_path / "f")
    item = Formatter(loaded.tokenizer, max_length=64).encode(ScoreItem(prompt="What is 3 + 11?", response="14."))
    from rewardkit.core.scoring import Scorer

    assert Scorer(loaded).score_batch([item])[0].raw_reward == pytest.approx(
        Scorer(full.rm).score_batch([item])[0].raw_reward, abs=1e-5)
    lora = train_idrm(IdRMConfig(output_dir=str(tmp_path / "l"), lora_layers="all", lora_r=2,  # type: ignore[arg-type]
                                 **base))
    assert lora.metrics["lora_layers"] == "all"
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "l" / "adapter" / "adapter_model.safetensors"))
    assert any(".layers.0." in k for k in keys) and any(".layers.1." in k for k in keys)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="frozen"):
        IdRMConfig(train_file="x", output_dir="y", mode="frozen").validate()
    with pytest.raises(ValueError, match="eta"):
        IdRMConfig(train_file="x", output_dir="y", eta=-1).validate()
    with pytest.raises(ValueError, match="align_layers"):
        IdRMConfig(train_file="x", output_dir="y", align_layers=0).validate()


def test_teacher_difference_head_learns_which_response_wins_in_both_orders(tiny_teacher_dir: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The teacher's pairwise head reads mean(A) - mean(B): a toy preference (the response with "correct" wins)
    is learned in a few steps, in both orders, and swapping A and B flips the logit's sign."""
    from rewardkit.training.idrm import finetune_teacher

    torch.manual_seed(0)
    teacher = Teacher(tiny_teacher_dir, max_length=64)
    good, bad = "the answer is correct", "the answer is wrong"
    ex = []
    for i in range(16):
        p = f"question {i}"
        ex.append((teacher.build(p, good, bad), 1.0, i, 0))
        ex.append((teacher.build(p, bad, good), 0.0, i, 1))
    cfg = IdRMConfig(train_file="x", output_dir="y", teacher_epochs=8, teacher_batch_size=8, teacher_lr=1e-3,
                     disable_tqdm=True)
    stats = finetune_teacher(teacher, ex, cfg)
    assert stats["teacher_accuracy"] == 1.0 and stats["teacher_loss"] < 0.5
    # without a bar (nohup runs, benches) the fine-tune still says how far it is: a line per tenth of its 32 steps
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("teacher fine-tune step")]
    assert len(lines) == 11 and lines[-1].startswith("teacher fine-tune step 32/32: loss ")
    with torch.no_grad():
        logits, _ = teacher([e[0] for e in ex])
    assert (logits[0::2] > 0).all() and (logits[1::2] < 0).all()


# ---------------------------------------------------------------------------------------------- response rows (issue 20)


def test_attention_rows_match_the_single_row_and_the_eager_map(tiny_llama_dir: Path) -> None:
    """``attention_rows`` (several query positions per item) equals ``attention_row`` at each position and the eager
    attention map of the same model; a -1 query gives a zero row."""
    from rewardkit.core.attention import capture

    rm = load_reward_model(tiny_llama_dir)
    fmt = Formatter(rm.tokenizer, max_length=64)
    items = [fmt.encode(ScoreItem(prompt="What is 2 + 2?", response=r)) for r in ("2 + 2 = 4.", "It is 5, I think.")]
    from rewardkit.core.forward import pad_batch

    ids, mask, pos = pad_batch(items, rm.pad_token_id, "right", rm.device)
    n0 = items[0].num_tokens
    queries = torch.tensor([[1, n0 - 1, -1], [2, 5, items[1].num_tokens - 1]])
    with torch.no_grad(), capture([0, 1], queries[:, 1], queries=queries) as cap:
        rm.model(input_ids=ids, attention_mask=mask, position_ids=pos)
    rows = cap.mean_query_rows()  # (2, 3, T)
    assert rows.shape == (2, 3, ids.shape[1])
    assert torch.allclose(rows[:, 1], cap.mean_row(), atol=1e-6)  # the same positions as the single-row capture
    assert float(rows[0, 2].abs().sum()) == 0.0
    assert torch.allclose(rows[0, :2].sum(-1), torch.ones(2), atol=1e-5)
    assert float(rows[0, 0, 2:].abs().sum()) == 0.0  # causal: query 1 sees keys 0..1 only
    rm.model.set_attn_implementation("eager")  # the reference: transformers' own attention maps
    with torch.no_grad():
        out = rm.model(input_ids=ids, attention_mask=mask, position_ids=pos, output_attentions=True)
    ref = torch.stack([a.float().mean(1) for a in out.attentions]).mean(0)  # (B, T, T) heads, then layers averaged
    assert torch.allclose(rows[1, 1], ref[1, 5], atol=1e-5)
    assert torch.allclose(rows[0, 0], ref[0, 1], atol=1e-5)


def _hand_target() -> tuple[object, np.ndarray, dict[str, np.ndarray]]:
    from transformers import AutoTokenizer  # noqa: F401  (keeps the fixture-free test close to the real path)

    tok = make_tokenizer()
    item = Formatter(tok, max_length=64).encode(ScoreItem(prompt="Say hi.", response="ab cd"))
    n_chars = item.response_end - item.response_start
    # two teacher tokens: "ab" (0..2) and "cd" (3..5); "cd" attends only to "ab", "ab" to itself
    maps = {"offsets": np.array([[0, 2], [3, 5]]), "rows": np.array([[0.5, 0.0], [0.3, 0.1]]),
            "prompt": np.array([0.5, 0.6]), "reward_mass": np.array([0.7])}
    char_mass = np.zeros(n_chars)
    char_mass[3:5] = 0.5
    return item, char_mass, maps


def test_student_row_targets_map_rows_by_characters_and_keep_the_teachers_mass() -> None:
    from rewardkit.training.idrm import student_row_targets

    item, char_mass, maps = _hand_target()
    t = student_row_targets(item, char_mass, maps)
    rel = [(item.offsets[i][0] - item.response_start, item.offsets[i][1] - item.response_start) for i in t.idx]
    in_ab = [j for j, (s, e) in enumerate(rel) if s < 2 and e > 0]
    in_cd = [j for j, (s, e) in enumerate(rel) if s < 5 and e > 3]
    assert in_ab and in_cd and t.rows.shape == (len(t.idx), len(t.idx))
    j = in_cd[-1]  # a "cd" query: its mass sits on the "ab" keys (0.3) and on the "cd" keys (0.1)
    assert t.rows[j, in_ab].sum() == pytest.approx(0.3) and t.rows[j, in_cd].sum() == pytest.approx(0.1)
    # its teacher share on the response so far: (0.3 + the causal part of 0.1) / (that + 0.6 on the prompt)
    causal = np.tril(t.rows)[j].sum()
    assert t.mass[j] == pytest.approx(causal / (causal + 0.6))
    assert t.reward_mass == pytest.approx(0.7) and t.dist.sum() == pytest.approx(1.0)
    assert t.dist[in_cd].sum() == pytest.approx(1.0)  # the reward target: all on "cd"
    assert all(not t.valid[k] for k, (s, e) in enumerate(rel) if e <= s or s >= 5 or (2 <= s and e <= 3))


def test_controls_shuffle_places_and_uniform_keeps_the_mass() -> None:
    from rewardkit.training.idrm import control_target, student_row_targets

    item, char_mass, maps = _hand_target()
    t = student_row_targets(item, char_mass, maps)
    rng = np.random.default_rng(0)
    sh = control_target(t, "shuffled", rng)
    assert sorted(sh.dist.tolist()) == pytest.approx(sorted(t.dist.tolist()))
    assert sorted(sh.mass.tolist()) == pytest.approx(sorted(t.mass.tolist()))
    assert sh.rows.sum() == pytest.approx(t.rows.sum())
    un = control_target(t, "uniform", rng)
    assert un.dist == pytest.approx(np.full(len(t.idx), 1 / len(t.idx)))
    assert np.array_equal(un.mass, t.mass) and un.reward_mass == t.reward_mass
    assert control_target(t, "teacher", rng) is t


def test_row_kl_and_mass_terms_move_attention_off_a_sink(tiny_llama_dir: Path) -> None:
    """The response-row KL and the mass term both have gradient into q/k, and steps on the mass term alone raise the
    share of the aligned rows that lands on the response (away from the template and BOS)."""
    from rewardkit.training.idrm import row_kl_and_mass, sample_queries  # noqa: F401

    rm = load_reward_model(tiny_llama_dir)
    cfg = IdRMConfig(model=str(tiny_llama_dir), train_file="x", output_dir="y", lora_target_modules="q_proj,k_proj")
    layers = align_layer_indices(rm, 1)
    setup_trainable(cfg, rm, layers)
    fmt = Formatter(rm.tokenizer, max_length=64)
    items = [fmt.encode(ScoreItem(prompt="What is 2 + 2?", response=r)) for r in ("2 + 2 = 4.", "It is 5, I think.")]
    targets = []
    for it in items:
        keep = it.response_token_indices()
        m = len(keep)
        targets.append(StudentTarget(keep, np.full(m, 1 / m), np.ones((m, m)), np.full(m, 0.95), 0.95,
                                     np.ones(m, dtype=bool)))
    fwd = RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule)
    lora = [p for n, p in rm.model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(lora, lr=0.05)

    def run() -> tuple[torch.Tensor, dict[str, float]]:
        total, bt, _, _, parts = idrm_step_loss(fwd, rm, items, targets, layers, eta=1.0, align_queries=8,
                                                mass_weight=1.0, gen=torch.Generator().manual_seed(0))
        return total - bt, parts

    first, parts0 = run()
    assert {"kl_reward", "kl_rows", "mass"} <= set(parts0) and parts0["mass"] > 0
    for _ in range(15):
        opt.zero_grad()
        loss, _ = run()
        loss.backward()
        opt.step()
    _, parts1 = run()
    assert parts1["mass"] < parts0["mass"]


def test_teacher_gate_refuses_a_teacher_no_better_than_the_student(tiny_llama_dir: Path, tiny_teacher_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Disjoint teacher pairs and the held-out check: an untrained tiny teacher is refused with the numbers, and with
    the gate off the run records them."""
    from rewardkit.training.idrm import teacher_data

    data = tmp_path / "tb"
    data.mkdir()
    rows = _rows(24)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]), encoding="utf-8")
    (data / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]), encoding="utf-8")
    base = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=1, batch_size=4,
                learning_rate=1e-3, disable_tqdm=True, max_length=64, seed=1, eta=1.0, align_layers=1,
                max_train_pairs=6, teacher_model=str(tiny_teacher_dir), teacher_epochs=0, teacher_pairs=8,
                teacher_exclude=6, teacher_val_pairs=8)
    cfg = IdRMConfig(output_dir=str(tmp_path / "a"), teacher_min_gain=0.5, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="teacher_min_gain"):
        train_idrm(cfg)
    res = train_idrm(IdRMConfig(output_dir=str(tmp_path / "b"), teacher_min_gain=-1, **base))  # type: ignore[arg-type]
    rep = res.metrics["teacher"]
    assert rep["teacher_disjoint"] is True and rep["teacher_pairs"] == 8 and rep["teacher_val_pairs"] == 8
    assert rep["teacher_val_gain"] == pytest.approx(rep["teacher_val_accuracy"] - rep["student_val_accuracy"])
    # the teacher's pairs are disjoint from the student's and from the excluded sample
    from rewardkit.training.loop import load_pairs

    student, _, _ = load_pairs(str(data), "train", 6, 1, 0.5)
    t_train, t_val = teacher_data(IdRMConfig(output_dir="x", **base), [])  # type: ignore[arg-type]
    keys = {json.dumps([p.prompt, p.chosen]) for p in student}
    assert t_train is not None and len(t_train) == 8 and not keys & {json.dumps([p.prompt, p.chosen]) for p in t_train}
    assert len(t_val) == 8
    with pytest.raises(ValueError, match="teacher_pairs"):
        teacher_data(IdRMConfig(output_dir="x", **{**base, "teacher_pairs": 12}), [])  # type: ignore[arg-type]


def test_attention_targets_from_the_data_move_the_reward_tokens_attention(tiny_llama_dir: Path,
                                                                          tmp_path: Path) -> None:
    """attention_source=data (issue 21's attention step): rows carry [start, end, weight] spans; training moves the
    reward token's attention onto them, with no teacher; a malformed span is a clear error naming the row."""
    from rewardkit.core.attention import capture
    from rewardkit.core.forward import pad_batch, reward_indices

    rows = []
    for r in _rows(16):
        c, j = str(r["chosen"]), str(r["chosen"]).index("=")
        rows.append({**r, "chosen_attention": [[j + 2, len(c) - 1, 1.0]], "rejected_attention": [[0, 2, 1.0]]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def share(rm) -> float:  # type: ignore[no-untyped-def]
        fmt = Formatter(rm.tokenizer, max_length=64)
        tot = 0.0
        for r in rows[:6]:
            it = fmt.encode(ScoreItem(prompt=str(r["prompt"]), response=str(r["chosen"])))
            ids, mask, pos = pad_batch([it], rm.pad_token_id, "right", rm.device)
            idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)
            with torch.no_grad(), capture([1], idx) as cap:
                rm.model(input_ids=ids, attention_mask=mask, position_ids=pos)
            row = cap.mean_row()[0]
            keep, dist = student_targets(it, np.ones(len(it.response)))
            a, b = r["chosen_attention"][0][:2]
            on = [i for i in keep if it.offsets[i][0] - it.response_start < b and
                  it.offsets[i][1] - it.response_start > a]
            tot += float(row[on].sum() / row[keep].sum())
        return tot / 6

    before = share(load_reward_model(tiny_llama_dir))
    res = train_idrm(IdRMConfig(model=str(tiny_llama_dir), train_file=str(data), output_dir=str(tmp_path / "o"),
                                device="cpu", mode="full", num_epochs=3, batch_size=4, learning_rate=3e-3,
                                disable_tqdm=True, max_length=64, seed=0, eta=1.0, align_layers=1,
                                attention_source="data"))
    assert res.metrics["teacher"]["attention_source"] == "data" and res.metrics["teacher"]["texts_with_targets"] == 32
    after = share(load_reward_model(tmp_path / "o"))
    assert after > before + 0.1, (before, after)
    bad = [{**rows[0], "chosen_attention": [[0, 999, 1.0]]}]
    data.write_text(json.dumps(bad[0]) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs\[0\]\.chosen_attention\[0\]"):
        train_idrm(IdRMConfig(model=str(tiny_llama_dir), train_file=str(data), output_dir=str(tmp_path / "p"),
                              device="cpu", mode="full", num_epochs=1, batch_size=4, disable_tqdm=True,
                              max_length=64, eta=1.0, align_layers=1, attention_source="data"))
