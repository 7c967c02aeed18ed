"""Tests for rewardkit.training.data: TRL-format preference loading, drop accounting, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardkit.training.data import (
    DataError,
    LoadReport,
    PreferencePair,
    drop_too_long,
    load_jsonl,
    load_parquet,
    load_preferences,
    load_records,
)


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


ROWS = [
    {
        "prompt": "What is 2 + 2?",
        "chosen": "It is 4.",
        "rejected": "It is 5.",
        "margin": 1.5,
        "task": "arith",
    },
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "task": "facts"},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No.", "margin": 2, "artifacts": {"length": True}},
]


def _write_jsonl(path: Path, rows: list[object], blank_lines: bool = False) -> Path:
    lines = [json.dumps(r) for r in rows]
    text = ("\n\n" if blank_lines else "\n").join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def test_records_standard_format_keeps_margin_and_meta() -> None:
    pairs, report = load_preferences(ROWS)
    assert report.rows_read == 3 and report.kept == 3 and report.dropped == {}
    first = pairs[0]
    assert isinstance(first, PreferencePair)
    assert (first.prompt, first.chosen, first.rejected, first.margin) == (
        "What is 2 + 2?",
        "It is 4.",
        "It is 5.",
        1.5,
    )
    assert first.meta == {"task": "arith"}
    assert pairs[1].margin is None
    assert pairs[2].margin == 2.0 and isinstance(pairs[2].margin, float)
    assert pairs[2].meta == {"artifacts": {"length": True}}
    assert not first.is_conversational


def test_pair_is_frozen() -> None:
    pairs, _ = load_preferences(ROWS)
    with pytest.raises(AttributeError):
        pairs[0].chosen = "changed"  # type: ignore[misc]


def test_jsonl_and_parquet_give_same_pairs_as_records(tmp_path: Path) -> None:
    from_list, _ = load_preferences(ROWS)
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS, blank_lines=True)
    from_jsonl, rep_j = load_preferences(jsonl)
    parquet_rows = [{k: r.get(k) for k in ("prompt", "chosen", "rejected", "margin")} for r in ROWS]
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "d.parquet")
    from_parquet, rep_p = load_preferences(str(tmp_path / "d.parquet"))
    assert from_jsonl == from_list
    assert rep_j.rows_read == 3 and rep_p.rows_read == 3
    assert [(p.prompt, p.chosen, p.rejected, p.margin) for p in from_parquet] == [
        (p.prompt, p.chosen, p.rejected, p.margin) for p in from_list
    ]
    assert rep_j.source.endswith("d.jsonl")


def test_parquet_conversational_rows(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": [_msg("user", "Capital of Japan?")],
            "chosen": [_msg("assistant", "Tokyo.")],
            "rejected": [_msg("assistant", "Osaka.")],
        }
    ] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    pairs, report = load_parquet(tmp_path / "c.parquet")
    assert report.kept == 2
    assert pairs[0].prompt == [_msg("user", "Capital of Japan?")]
    assert pairs[0].chosen == [_msg("assistant", "Tokyo.")]
    assert pairs[0].is_conversational


def test_explicit_conversational_rows_are_copied() -> None:
    chosen = [_msg("assistant", "Paris.")]
    row = {
        "prompt": [_msg("user", "Capital of France?")],
        "chosen": chosen,
        "rejected": [_msg("assistant", "Rome.")],
    }
    pairs, _ = load_records([row])
    chosen[0]["content"] = "mutated"
    assert pairs[0].chosen == [_msg("assistant", "Paris.")]


def test_implicit_prompt_conversational() -> None:
    shared = [_msg("system", "Be brief."), _msg("user", "What is 3 + 4?")]
    row = {
        "chosen": [*shared, _msg("assistant", "7.")],
        "rejected": [*shared, _msg("assistant", "8.")],
        "source": "hh",
    }
    pairs, report = load_records([row])
    assert report.kept == 1
    assert pairs[0].prompt == shared
    assert pairs[0].chosen == [_msg("assistant", "7.")]
    assert pairs[0].rejected == [_msg("assistant", "8.")]
    assert pairs[0].meta == {"source": "hh"}


def test_implicit_prompt_plain_strings_cut_at_word_boundary() -> None:
    row = {
        "chosen": "Human: What is 40 + 5?\n\nAssistant: 45",
        "rejected": "Human: What is 40 + 5?\n\nAssistant: 4",
    }
    pairs, _ = load_records([row])
    p = pairs[0]
    assert p.prompt == "Human: What is 40 + 5?\n\nAssistant:"
    assert (p.chosen, p.rejected) == (" 45", " 4")
    assert p.prompt + p.chosen == row["chosen"] and p.prompt + p.rejected == row["rejected"]


def test_drop_counts_per_reason() -> None:
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(7)]
    bad = [
        {"prompt": "q", "chosen": "   ", "rejected": "no"},
        {"prompt": "q", "chosen": "yes", "rejected": ""},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {
            "prompt": [_msg("user", "q")],
            "chosen": [_msg("assistant", " ")],
            "rejected": [_msg("assistant", "x")],
        },
        # implicit prompt where chosen is the whole shared prefix: nothing left to prefer
        {"chosen": [_msg("user", "q")], "rejected": [_msg("user", "q"), _msg("assistant", "a")]},
        # full conversations that are identical
        {
            "chosen": [_msg("user", "q"), _msg("assistant", "a")],
            "rejected": [_msg("user", "q"), _msg("assistant", "a")],
        },
    ]
    pairs, report = load_records(good + bad)
    assert report.rows_read == 13 and report.kept == 7 and len(pairs) == 7
    assert report.dropped == {"empty_chosen": 3, "empty_rejected": 1, "identical": 2}
    assert report.n_dropped == 6
    assert report.to_dict()["dropped"] == {"empty_chosen": 3, "empty_rejected": 1, "identical": 2}
    assert "kept=7" in str(report)


def test_more_than_half_dropped_raises() -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 3 + [
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    ] * 2
    with pytest.raises(DataError, match=r"3 of 5 rows would be dropped \(identical=3\)"):
        load_records(rows)
    pairs, report = load_records(rows, max_drop_fraction=0.8)
    assert len(pairs) == 2 and report.dropped == {"identical": 3}


def test_exactly_half_dropped_is_allowed() -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs, report = load_records(rows)
    assert len(pairs) == 1 and report.dropped == {"identical": 1}


@pytest.mark.parametrize(
    ("row", "field", "fragment"),
    [
        ({"prompt": "q", "rejected": "no"}, "chosen", "field 'chosen' is missing"),
        ({"prompt": "q", "chosen": "yes"}, "rejected", "field 'rejected' is missing"),
        ({"prompt": "q", "chosen": 3, "rejected": "no"}, "chosen", "must be a string or a list of messages"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "finite number"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "margin", "finite number"),
        ({"prompt": "q", "chosen": "a", "rejected": [_msg("assistant", "b")]}, "rejected", "like 'chosen'"),
        ({"prompt": [_msg("user", "q")], "chosen": "a", "rejected": "b"}, "prompt", "like 'chosen'"),
        (
            {"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": [_msg("assistant", "b")]},
            "chosen[0].content",
            "must be a string, got missing",
        ),
        (
            {"prompt": "q", "chosen": [_msg("assistant", "a")], "rejected": ["b"]},
            "rejected[0]",
            "message object",
        ),
    ],
)
def test_malformed_row_names_row_and_field(row: dict[str, object], field: str, fragment: str) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2 + [row]
    with pytest.raises(DataError) as info:
        load_records(rows)
    assert info.value.row == 2
    assert info.value.field == field
    assert "row 2" in str(info.value) and fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_jsonl_errors_name_row_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(
        DataError, match=r"row 1 \(line 3\) of .*bad.jsonl: field 'rejected' is missing"
    ) as info:
        load_jsonl(path)
    assert (info.value.row, info.value.field) == (1, "rejected")
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\).*invalid JSON") as info:
        load_jsonl(path)
    assert info.value.row == 1


def test_non_object_row_and_empty_source(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="row 0 .*expected an object") as info:
        load_records([["a", "b"]])  # type: ignore[list-item]
    assert info.value.row == 0
    with pytest.raises(DataError, match="no rows"):
        load_records([])
    with pytest.raises(DataError, match="unsupported file type"):
        load_preferences(tmp_path / "data.csv")


def test_drop_too_long_counts_and_guards() -> None:
    pairs, _ = load_records([{"prompt": "q", "chosen": "x" * n, "rejected": "y"} for n in (1, 5, 10, 20)])
    kept, report = drop_too_long(pairs, lambda p: len(p.chosen), max_tokens=10)
    assert [len(p.chosen) for p in kept] == [1, 5, 10]
    assert isinstance(report, LoadReport)
    assert (report.rows_read, report.kept, report.dropped) == (4, 3, {"too_long": 1})
    with pytest.raises(
        DataError, match=r"3 of 4 rows would be dropped \(too_long=3\).*raise max_tokens \(now 4\)"
    ):
        drop_too_long(pairs, lambda p: len(p.chosen), max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        drop_too_long(pairs, lambda p: 1, max_tokens=0)
    with pytest.raises(DataError, match="length_fn returned -1 for pair 0"):
        drop_too_long(pairs, lambda p: -1, max_tokens=3)
