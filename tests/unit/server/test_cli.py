"""``rewardkit serve`` flags map onto Settings (flags override env vars; absent flags leave the defaults)."""

from __future__ import annotations

import pytest

from rewardkit.cli import build_parser
from rewardkit.server.cli import settings_from_args


def _args(argv: list[str]):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", *argv])


def test_no_flags_gives_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REWARDKIT_ABC_LAYER", raising=False)
    s = settings_from_args(_args([]))
    assert (s.abc_layer, s.abc_num_layers, s.abc_renormalize, s.prefix_sharing, s.truncate) == (-1, 1, True, True, True)


def test_flags_reach_settings_and_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDKIT_ABC_LAYER", "-3")
    s = settings_from_args(_args(["--abc-layer", "-2", "--abc-num-layers", "2", "--no-abc-renormalize",
                                  "--no-prefix-sharing", "--no-truncate", "--max-wait-ms", "7", "--port", "9001"]))
    assert (s.abc_layer, s.abc_num_layers, s.abc_renormalize) == (-2, 2, False)
    assert (s.prefix_sharing, s.truncate, s.max_wait_ms, s.port) == (False, False, 7.0, 9001)
    assert settings_from_args(_args([])).abc_layer == -3  # env var applies when the flag is absent
