"""Reward components (rewardkit.server.compose.components) and the settings that configure them."""

from __future__ import annotations

import math

import pytest

from rewardkit.server.compose.components import (
    ComponentError,
    ConfigError,
    ExactMatch,
    LengthPenalty,
    NumericMatch,
    Regex,
    build_components,
    last_boxed,
    parse_component_spec,
)
from rewardkit.server.settings import Settings, split_model_spec


def test_length_penalty_chars_and_words() -> None:
    c = LengthPenalty("lp", limit=10)
    assert c.score("x" * 10, None) == 0.0
    assert c.score("x" * 15, None) == pytest.approx(-0.5)
    assert c.score("x" * 1000, None) == -1.0  # clipped at max_penalty
    w = LengthPenalty("lw", limit=2, unit="words", max_penalty=0.25)
    assert w.score("one two", None) == 0.0
    assert w.score("one two three", None) == pytest.approx(-0.25)
    assert w.config() == {"limit": 2, "unit": "words", "max_penalty": 0.25}


def test_regex_search_fullmatch_and_flags() -> None:
    think = Regex("fmt", pattern="<think>.*</think>", flags="s")
    assert think.score("<think>a\nb</think> 4", None) == 1.0
    assert think.score("4", None) == 0.0
    assert Regex("f", pattern="<THINK>", flags="i").score("x <think>", None) == 1.0
    full = Regex("f", pattern=r"\d+", mode="fullmatch")
    assert full.score("42", None) == 1.0 and full.score("42!", None) == 0.0


def test_exact_match_normalises_and_reads_the_last_boxed() -> None:
    c = ExactMatch("em")
    assert c.score("The answer is \\boxed{Paris}.", "paris") == 1.0
    assert c.score("\\boxed{London} no wait \\boxed{Paris}", "Paris") == 1.0
    assert c.score("  $x^2$ . ", "X^2") == 1.0
    assert c.score("\\boxed{Lyon}", "Paris") == 0.0
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"  # nested braces kept
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"  # an unclosed last one: the one before
    with pytest.raises(ComponentError, match="reference"):
        c.score("x", None)


def test_numeric_match() -> None:
    c = NumericMatch("nm")
    assert c.score("so 7*8 = 56.", "56") == 1.0
    assert c.score("\\boxed{1,234.0}", "1234") == 1.0
    assert c.score("-3", "-3.0") == 1.0
    assert c.score("55", "56") == 0.0
    assert c.score("no number", "56") == 0.0
    assert NumericMatch("t", rel_tol=0.1).score("57", "56") == 1.0
    with pytest.raises(ComponentError, match="no number"):
        c.score("56", "fifty-six")
    with pytest.raises(ComponentError, match="reference"):
        c.score("56", None)


@pytest.mark.parametrize(("spec", "match"), [
    ("nope", "NAME=KIND"),
    ("x=unknown_kind", "unknown kind"),
    ("x=regex", "needs a pattern"),
    ("x=regex:{\"pattern\": \"(\"}", "does not compile"),
    ("x=regex:{\"pattern\": \"a\", \"flags\": \"q\"}", "unknown flag"),
    ("x=length_penalty:{\"limit\": 0}", "limit must be >= 1"),
    ("x=length_penalty:{\"limit\": \"10\"}", "limit must be"),
    ("x=length_penalty:{\"limit\": true}", "limit must be"),
    ("x=length_penalty:{\"lmit\": 10}", "unknown parameter"),
    ("x=length_penalty:[1]", "JSON object"),
    ("x=length_penalty:{bad", "not JSON"),
    ("x=numeric_match:{\"rel_tol\": 2}", "rel_tol"),
])
def test_bad_component_specs_say_what_is_wrong(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_components([spec])


def test_parse_and_build() -> None:
    assert parse_component_spec('c=length_penalty:{"limit": 5}') == ("c", "length_penalty", {"limit": 5})
    comps = build_components(['c=length_penalty:{"limit": 5}', 'numeric_match=numeric_match:{"rel_tol": 0.01}'])
    assert set(comps) == {"c", "exact_match", "numeric_match"}  # the built-ins are always there
    assert isinstance(comps["numeric_match"], NumericMatch) and comps["numeric_match"].rel_tol == 0.01
    with pytest.raises(ConfigError, match="twice"):
        build_components(["c=exact_match", "c=exact_match"])


def test_settings_model_name_and_extra_models(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = Settings(model="policy-rm=/models/a", extra_models="math=/models/b,safety=/models/c")
    assert (s.model, s.model_name) == ("/models/a", "policy-rm")
    assert s.extra_models == {"math": "/models/b", "safety": "/models/c"}
    assert s.model_names_configured() == ["default", "policy-rm", "math", "safety"]
    assert Settings(extra_models='{"m": "/x"}').extra_models == {"m": "/x"}
    odd = tmp_path / "a=b"  # an existing path with '=' in it stays a path
    odd.mkdir()
    assert split_model_spec(str(odd)) == (None, str(odd))
    assert split_model_spec("embedded:smollm2") == (None, "embedded:smollm2")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"default_rewards": "nosuch=1"}, "neither a model"),
    ({"default_rewards": "default=inf"}, "finite"),
    ({"default_rewards": "default=5000"}, "finite"),
    ({"extra_models": "default=/x"}, "must differ"),
    ({"extra_models": "exact_match=/x"}, "a model or a component"),
    ({"extra_models": "bad name=/x"}, "must match"),
    ({"extra_models": "nopath"}, "NAME=PATH"),
    ({"components": "x=nosuch"}, "unknown kind"),
])
def test_settings_reject_bad_compositions(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Settings(**kwargs)


def test_settings_components_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REWARDKIT_COMPONENTS", '["c=length_penalty:{\\"limit\\": 5}", "f=regex:{\\"pattern\\": \\"x\\"}"]')
    monkeypatch.setenv("REWARDKIT_DEFAULT_REWARDS", "default=1,c=0.5")
    s = Settings()
    assert s.components == ['c=length_penalty:{"limit": 5}', 'f=regex:{"pattern": "x"}']
    assert s.default_rewards == {"default": 1.0, "c": 0.5}
    assert math.isfinite(s.default_rewards["c"])
