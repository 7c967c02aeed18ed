"""Tests for rewardkit.training.testbed: ground truth, artifact bookkeeping, determinism, manifest, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rewardkit.training.data import load_preferences
from rewardkit.training.testbed import (
    ARTIFACTS,
    FAMILIES,
    SPLITS,
    TestbedConfig,
    check,
    generate_split,
    make_testbed,
)
from rewardkit.training.testbed.artifacts import BOILERPLATE_CLOSERS, BOILERPLATE_OPENERS, FILLER
from rewardkit.training.testbed.cli import add_parser
from rewardkit.training.testbed.tasks import (
    _ALL_CITIES,
    _CATEGORIES,
    GENERAL_FACTS,
    number_words,
)

Row = dict[str, Any]
SMALL = {"n_train": 60, "n_val": 20, "n_test": 20}


@pytest.fixture(scope="module")
def default_splits() -> dict[str, list[Row]]:
    """Every split at the default sizes (train 4000, validation 500, each test 500), seed 0."""
    cfg = TestbedConfig()
    return {split: generate_split(split, cfg) for split in SPLITS}


def _all_rows(splits: dict[str, list[Row]]) -> list[tuple[str, Row]]:
    return [(name, row) for name, rows in splits.items() for row in rows]


def _count_filler(text: str) -> int:
    return sum(text.count(s) for s in FILLER)


def _has_boilerplate(text: str) -> bool:
    return any(p in text for p in BOILERPLATE_OPENERS + BOILERPLATE_CLOSERS)


def _has_markdown(text: str) -> bool:
    return "**" in text or text.startswith("- ")


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------


def test_sizes_and_row_schema(default_splits: dict[str, list[Row]]) -> None:
    sizes = {name: len(rows) for name, rows in default_splits.items()}
    assert sizes == {
        "train": 4000,
        "validation": 500,
        **{s: 500 for s in SPLITS if s not in ("train", "validation")},
    }
    for name, row in _all_rows(default_splits):
        assert set(row) == {"id", "prompt", "chosen", "rejected", "task", "artifacts", "answer_span"}
        assert row["id"].startswith(name + "-")
        assert set(row["artifacts"]) == set(ARTIFACTS)
        assert row["chosen"] != row["rejected"]
    ids = [row["id"] for _, row in _all_rows(default_splits)]
    assert len(ids) == len(set(ids))


def test_checker_agrees_with_label_on_every_row(default_splits: dict[str, list[Row]]) -> None:
    for name, row in _all_rows(default_splits):
        assert check(row["task"], row["chosen"]), (name, row)
        assert not check(row["task"], row["rejected"]), (name, row)


def test_answer_span_slices_the_deciding_evidence(default_splits: dict[str, list[Row]]) -> None:
    for _, row in _all_rows(default_splits):
        for side, label in (("chosen", True), ("rejected", False)):
            start, end = row["answer_span"][side]
            text = row[side]
            assert 0 <= start < end <= len(text)
            piece = text[start:end]
            # The span alone decides, and the rest of the response without it decides nothing.
            assert check(row["task"], piece) is label, (side, piece, row)
            assert not check(row["task"], text[:start] + text[end:]), (side, row)


def test_all_families_present_and_mix_favours_learnable(default_splits: dict[str, list[Row]]) -> None:
    train = default_splits["train"]
    counts = {f: sum(r["task"]["family"] == f for r in train) for f in FAMILIES}
    assert all(c > 0 for c in counts.values()), counts
    assert (counts["facts"] + counts["arithmetic"]) / len(train) > 0.5
    kinds = {r["task"]["kind"] for r in train if r["task"]["family"] == "format"}
    assert kinds == {"uppercase", "number_words", "quoted", "list_count"}


def test_neutral_pools_hold_nothing_a_checker_reads() -> None:
    facts_words = {w for _, _, a, wrongs in GENERAL_FACTS for w in (a, *wrongs)}
    category_words = {w for ws in _CATEGORIES.values() for w in ws}
    numbers = {number_words(n) for n in range(100)}
    for sentence in FILLER + BOILERPLATE_OPENERS + BOILERPLATE_CLOSERS:
        assert not re.search(r"\d", sentence), sentence
        assert '"' not in sentence and "*" not in sentence, sentence
        phrases = facts_words | category_words | numbers | set(_ALL_CITIES)
        leaked = [
            p for p in phrases if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", sentence, re.IGNORECASE)
        ]
        assert not leaked, (sentence, leaked)


def test_checkers_reject_hedged_or_empty_answers() -> None:
    arith = {"family": "arithmetic", "op": "+", "a": 37, "b": 48, "answer": 85, "distractor": 83}
    assert check(arith, "37 + 48 equals 85.")
    assert not check(arith, "37 + 48 equals 85, or maybe 83.")
    assert not check(arith, "I am not sure.")
    cap = {
        "family": "facts",
        "kind": "capital",
        "country": "Australia",
        "answer": "Canberra",
        "distractor": "Sydney",
    }
    assert check(cap, "The capital of Australia is Canberra.")
    assert not check(cap, "It is Canberra or Sydney.")
    unit = {"family": "unit_conversion", "value": 3.5, "from": "kilometer", "to": "meters", "answer": 3500}
    assert check(unit, "3.5 kilometers is equal to 3,500 meters.")
    assert not check(unit, "3.5 kilometers is equal to 350 meters.")
    upper = {"family": "format", "kind": "uppercase", "answer": "Tokyo"}
    assert check(upper, "The capital of Japan is TOKYO.") and not check(upper, "It is TOKYO, that is Tokyo.")
    with pytest.raises(ValueError, match="task.family"):
        check({"family": "poetry"}, "text")


# ---------------------------------------------------------------------------------------------
# Artifacts: the bookkeeping is true of the text
# ---------------------------------------------------------------------------------------------


def _applies(record: dict[str, Any], side: str) -> bool:
    return bool(record["present"]) and record["on"] in (side, "both")


def test_artifact_records_are_consistent(default_splits: dict[str, list[Row]]) -> None:
    for _, row in _all_rows(default_splits):
        for name, rec in row["artifacts"].items():
            if not rec["present"]:
                assert rec == {"present": False, "on": "none", "agrees": False}
            elif name == "evidence_position":
                assert rec["on"] == "both" and rec["agrees"] == (rec["position"] == "late")
            else:
                assert rec["on"] in ("chosen", "rejected") and rec["agrees"] == (rec["on"] == "chosen")


def test_boilerplate_and_format_are_where_recorded(default_splits: dict[str, list[Row]]) -> None:
    for _, row in _all_rows(default_splits):
        for side in ("chosen", "rejected"):
            text = row[side]
            assert _has_boilerplate(text) == _applies(row["artifacts"]["boilerplate"], side), (side, row)
            assert _has_markdown(text) == _applies(row["artifacts"]["format"], side), (side, row)


def test_length_padding_is_where_recorded(default_splits: dict[str, list[Row]]) -> None:
    for _, row in _all_rows(default_splits):
        if row["artifacts"]["evidence_position"]["present"]:
            continue  # long responses share their filler; counted in the evidence test
        for side in ("chosen", "rejected"):
            n = _count_filler(row[side])
            assert (n >= 2) == _applies(row["artifacts"]["length"], side), (side, row)
            assert n <= 4


def test_flip_splits(default_splits: dict[str, list[Row]]) -> None:
    for art in ("length", "boilerplate", "format"):
        rows = default_splits[f"test_flip_{art}"]
        for row in rows:
            for name, rec in row["artifacts"].items():
                if name == art:
                    assert rec == {"present": True, "on": "rejected", "agrees": False}
                else:
                    assert not rec["present"]
        if art == "length":
            assert all(len(r["rejected"]) > len(r["chosen"]) for r in rows)
            assert all(len(r["rejected"].split()) >= len(r["chosen"].split()) + 10 for r in rows)
        if art == "boilerplate":
            assert all(_has_boilerplate(r["rejected"]) and not _has_boilerplate(r["chosen"]) for r in rows)
        if art == "format":
            assert all(_has_markdown(r["rejected"]) and not _has_markdown(r["chosen"]) for r in rows)


def test_clean_split_has_no_artifacts(default_splits: dict[str, list[Row]]) -> None:
    for row in default_splits["test_clean"]:
        assert not any(rec["present"] for rec in row["artifacts"].values())
        for side in ("chosen", "rejected"):
            assert (
                _count_filler(row[side]) == 0
                and not _has_boilerplate(row[side])
                and not _has_markdown(row[side])
            )


def test_evidence_position_early_and_late(default_splits: dict[str, list[Row]]) -> None:
    late_rows = default_splits["test_late_evidence"]
    for row in late_rows:
        rec = row["artifacts"]["evidence_position"]
        assert rec == {"present": True, "on": "both", "agrees": False, "position": "early"}
        for side in ("chosen", "rejected"):
            text, (start, end) = row[side], row["answer_span"][side]
            assert _count_filler(text[end:]) >= 15  # much filler after the evidence
            assert _count_filler(text[:start]) <= 1
            assert len(text[end:]) > 4 * len(text[:start])
    for row in default_splits["train"]:
        rec = row["artifacts"]["evidence_position"]
        if rec["present"]:
            for side in ("chosen", "rejected"):
                text, (start, end) = row[side], row["answer_span"][side]
                assert _count_filler(text) >= 6
                before, after = _count_filler(text[:start]), _count_filler(text[end:])
                padded = _applies(row["artifacts"]["length"], side)  # padding (2-4 sentences) goes last
                if rec["position"] == "late":
                    assert before >= 5 and after <= (5 if padded else 1)
                else:
                    assert before <= 1 and after >= 4


def test_response_lengths_fit_cpu_training(default_splits: dict[str, list[Row]]) -> None:
    # Words are a proxy for SmolLM2 tokens (about 1.2 tokens per word on this text; see docs/testbed.md).
    for name, rows in default_splits.items():
        words = sorted(len(r[s].split()) for r in rows for s in ("chosen", "rejected"))
        median, top = words[len(words) // 2], words[-1]
        if name == "test_late_evidence":
            assert 150 <= median and top <= 260, (name, median, top)
        else:
            assert median <= 60 and top <= 200, (name, median, top)


def test_train_correlation_is_p_agree(default_splits: dict[str, list[Row]]) -> None:
    train = default_splits["train"]
    for art in ARTIFACTS:
        present = [r for r in train if r["artifacts"][art]["present"]]
        assert len(present) > 800
        rate = sum(r["artifacts"][art]["agrees"] for r in present) / len(present)
        assert abs(rate - 0.8) < 0.04, (art, rate)
    # Measured on the text, not on the bookkeeping: where only the length artifact differs, the padded
    # response is the chosen one about p_agree of the time.
    only_len = [
        r
        for r in train
        if r["artifacts"]["length"]["present"] and not r["artifacts"]["boilerplate"]["present"]
    ]
    longer = sum(len(r["chosen"].split()) > len(r["rejected"].split()) for r in only_len) / len(only_len)
    assert abs(longer - 0.8) < 0.05, longer


def test_p_agree_is_configurable() -> None:
    rows = generate_split("train", TestbedConfig(n_train=2000, p_agree=0.5))
    present = [r for r in rows if r["artifacts"]["boilerplate"]["present"]]
    rate = sum(r["artifacts"]["boilerplate"]["agrees"] for r in present) / len(present)
    assert abs(rate - 0.5) < 0.06, rate


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"n_train": 0}, "n_train must be an integer >= 1"),
        ({"p_agree": 1.5}, r"p_agree must be within \[0, 1\]"),
        ({"presence": {"length": 0.5}}, "presence must have exactly the keys"),
        ({"family_weights": {"poetry": 1.0}}, "family_weights must use families"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TestbedConfig(**kwargs).validate()


# ---------------------------------------------------------------------------------------------
# Files: determinism, manifest, loader round trip, CLI
# ---------------------------------------------------------------------------------------------


def _file_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_same_bytes_different_seed_differs(tmp_path: Path) -> None:
    make_testbed(tmp_path / "a", seed=3, **SMALL)
    make_testbed(tmp_path / "b", seed=3, **SMALL)
    make_testbed(tmp_path / "c", seed=4, **SMALL)
    a, b, c = (_file_bytes(tmp_path / x) for x in "abc")
    assert sorted(a) == sorted([f"{s}.jsonl" for s in SPLITS] + ["manifest.json"])
    assert a == b
    assert all(a[f"{s}.jsonl"] != c[f"{s}.jsonl"] for s in SPLITS)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_determinism_across_processes_and_hash_seeds(tmp_path: Path) -> None:
    make_testbed(tmp_path / "inproc", seed=7, **SMALL)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    cmd = [
        sys.executable,
        "-m",
        "rewardkit.training.testbed",
        "make",
        "--out",
        str(tmp_path / "sub"),
        "--seed",
        "7",
        "--n-train",
        "60",
        "--n-val",
        "20",
        "--n-test",
        "20",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert _file_bytes(tmp_path / "inproc") == _file_bytes(tmp_path / "sub")


def test_test_size_does_not_change_train(tmp_path: Path) -> None:
    small = generate_split("train", TestbedConfig(n_train=50, n_test=10))
    other = generate_split("train", TestbedConfig(n_train=50, n_test=30))
    assert small == other


def test_manifest(tmp_path: Path) -> None:
    manifest = make_testbed(tmp_path, seed=5, n_train=300, n_val=40, n_test=40, p_agree=0.7)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["seed"] == 5 and manifest["p_agree"] == 0.7 and manifest["generator_version"] == "1"
    assert manifest["counts"] == {"train": 300, "validation": 40, **{s: 40 for s in list(SPLITS)[2:]}}
    for info in manifest["splits"].values():
        data = (tmp_path / info["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["sha256"]
        rows = [json.loads(line) for line in data.decode().splitlines()]
        for art in ARTIFACTS:
            present = [r["artifacts"][art] for r in rows if r["artifacts"][art]["present"]]
            assert info["artifacts"][art]["present_rate"] == round(len(present) / len(rows), 4)
        longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / len(rows)
        assert info["chosen_longer_rate"] == round(longer, 4)
    flip = manifest["splits"]["test_flip_length"]["artifacts"]["length"]
    assert flip["present_rate"] == 1.0 and flip["agree_rate"] == 0.0
    assert manifest["splits"]["test_flip_length"]["chosen_longer_rate"] == 0.0


def test_loader_reads_testbed_files(tmp_path: Path) -> None:
    make_testbed(tmp_path, seed=0, **SMALL)
    pairs, report = load_preferences(tmp_path / "train.jsonl")
    assert report.rows_read == 60 and report.kept == 60 and report.dropped == {}
    assert set(pairs[0].meta) == {"id", "task", "artifacts", "answer_span"}
    assert isinstance(pairs[0].prompt, str)


def test_cli_make(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="rewardkit")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "tb"
    args = parser.parse_args(
        [
            "testbed",
            "make",
            "--out",
            str(out),
            "--seed",
            "2",
            "--n-train",
            "40",
            "--n-val",
            "10",
            "--n-test",
            "10",
            "--p-agree",
            "0.9",
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "test_flip_length" in printed and "length pres/agree" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["p_agree"] == 0.9 and manifest["counts"]["train"] == 40
    bad = parser.parse_args(["testbed", "make", "--out", str(out), "--p-agree", "2"])
    assert bad.func(bad) == 2
    assert "p_agree must be within [0, 1]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["testbed"])  # the sub-command is required
