"""``rewardkit bench``: every listed benchmark exists, unknown names and a missing bench/ fail with exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from rewardkit.cli import main
from rewardkit.training.bench_cli import BENCHMARKS, find_bench_dir

ROOT = Path(__file__).resolve().parents[3]


def test_every_listed_benchmark_is_a_script() -> None:
    bench = find_bench_dir(str(ROOT / "bench"))
    assert bench is not None
    for script in BENCHMARKS.values():
        assert (bench / script).is_file(), script


def test_list_names_every_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--list"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BENCHMARKS)


def test_unknown_name_and_missing_dir_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "nope"])
    assert exc.value.code == 2
    assert "unknown benchmark" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--bench-dir", str(tmp_path), "serving"])
    assert exc.value.code == 2
    assert "bench/ not found" in capsys.readouterr().err


def test_runs_the_script_with_its_arguments() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--bench-dir", str(ROOT / "bench"), "abc-credit", "--help"])
    assert exc.value.code == 0
