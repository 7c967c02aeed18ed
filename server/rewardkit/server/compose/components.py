"""Built-in reward components: cheap, deterministic checks that a composed request adds to reward models.

Each is a small class with one ``score(response, reference) -> float``. Their parameters come from the server's
configuration only (``--component NAME=KIND[:JSON]``), never from a request: a request names a component and
gives it a weight, so no client can send a pattern or code for the server to run.

Kinds::

    length_penalty  -max(0, n - limit) / limit, clipped at -max_penalty; n in chars or words
    regex           1.0 if the pattern matches the response (search or fullmatch), else 0.0
    exact_match     1.0 if the answer equals the reference after normalisation; the answer is the last \\boxed{...}
                    when there is one, else the whole response
    numeric_match   1.0 if the last number of the answer is within tolerance of the reference's number

``exact_match`` and ``numeric_match`` need a reference (``items[i].reference``; OpenRLHF's ``labels``); an item
without one gets that component's error, not a guess.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")


class ComponentError(Exception):
    """This item cannot be scored by this component (the message says why); other items and components go on."""


class ConfigError(ValueError):
    """A component's configuration is wrong (raised at start-up, never for a request)."""


class Component:
    kind: ClassVar[str] = ""
    needs_reference: ClassVar[bool] = False
    params: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    def __init__(self, name: str, **params: Any) -> None:
        self.name = name
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise ConfigError(f"component {name!r} ({self.kind}): unknown parameter(s) {unknown}; "
                              f"expected some of {sorted(self.params)}")
        for key, value in params.items():
            want = self.params[key]
            if isinstance(value, bool) and bool not in (want if isinstance(want, tuple) else (want,)):
                raise ConfigError(f"component {name!r}: {key} must be {want}, got {value!r}")
            if not isinstance(value, want):
                raise ConfigError(f"component {name!r}: {key} must be {want}, got {value!r}")

    def score(self, response: str, reference: str | None) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}


class LengthPenalty(Component):
    kind = "length_penalty"
    params = {"limit": int, "unit": str, "max_penalty": (int, float)}

    def __init__(self, name: str, limit: int = 1000, unit: str = "chars", max_penalty: float = 1.0, **kw: Any) -> None:
        super().__init__(name, limit=limit, unit=unit, max_penalty=max_penalty, **kw)
        if limit < 1:
            raise ConfigError(f"component {name!r}: limit must be >= 1, got {limit}")
        if unit not in ("chars", "words"):
            raise ConfigError(f"component {name!r}: unit must be 'chars' or 'words', got {unit!r}")
        if not (max_penalty > 0 and math.isfinite(max_penalty)):
            raise ConfigError(f"component {name!r}: max_penalty must be a positive number, got {max_penalty}")
        self.limit, self.unit, self.max_penalty = limit, unit, float(max_penalty)

    def score(self, response: str, reference: str | None) -> float:
        n = len(response) if self.unit == "chars" else len(response.split())
        return -min(self.max_penalty, max(0, n - self.limit) / self.limit)

    def describe(self) -> str:
        return f"-max(0, {self.unit} - {self.limit}) / {self.limit}, at least -{self.max_penalty:g}"

    def config(self) -> dict[str, Any]:
        return {"limit": self.limit, "unit": self.unit, "max_penalty": self.max_penalty}


class Regex(Component):
    kind = "regex"
    params = {"pattern": str, "mode": str, "flags": str}
    _FLAGS: ClassVar[dict[str, re.RegexFlag]] = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}

    def __init__(self, name: str, pattern: str | None = None, mode: str = "search", flags: str = "", **kw: Any) -> None:
        if pattern is None:
            raise ConfigError(f"component {name!r} (regex): needs a pattern, e.g. "
                              f"--component {name}=regex:{{\"pattern\": \"<think>.*</think>\", \"flags\": \"s\"}}")
        super().__init__(name, pattern=pattern, mode=mode, flags=flags, **kw)
        if mode not in ("search", "fullmatch"):
            raise ConfigError(f"component {name!r}: mode must be 'search' or 'fullmatch', got {mode!r}")
        bad = sorted(set(flags) - set(self._FLAGS))
        if bad:
            raise ConfigError(f"component {name!r}: unknown flag(s) {bad}; use some of 'i', 'm', 's'")
        value = 0
        for f in flags:
            value |= self._FLAGS[f]
        try:
            self.regex = re.compile(pattern, value)
        except re.error as exc:
            raise ConfigError(f"component {name!r}: pattern {pattern!r} does not compile: {exc}") from None
        self.mode, self.flags = mode, flags

    def score(self, response: str, reference: str | None) -> float:
        match = self.regex.fullmatch(response) if self.mode == "fullmatch" else self.regex.search(response)
        return 1.0 if match else 0.0

    def describe(self) -> str:
        return f"1 if /{self.regex.pattern}/{self.flags} {'matches all of' if self.mode == 'fullmatch' else 'is found in'} the response, else 0"

    def config(self) -> dict[str, Any]:
        return {"pattern": self.regex.pattern, "mode": self.mode, "flags": self.flags}


def last_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        j = i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    return None


def answer_part(text: str) -> str:
    boxed = last_boxed(text)
    return text if boxed is None else boxed


def normalise(text: str) -> str:
    """Case, surrounding whitespace, ``$`` math delimiters, a final period and runs of spaces do not count."""
    s = " ".join(text.split()).lower()
    prev = None
    while s != prev:  # "$x$." and "$x.$" alike
        prev = s
        s = s.strip().strip("$").strip()
        if s.endswith("."):
            s = s[:-1]
    return s


class ExactMatch(Component):
    kind = "exact_match"
    needs_reference = True

    def score(self, response: str, reference: str | None) -> float:
        if reference is None:
            raise ComponentError("needs a reference (items[i].reference, or OpenRLHF labels)")
        return 1.0 if normalise(answer_part(response)) == normalise(answer_part(reference)) else 0.0

    def describe(self) -> str:
        return "1 if the answer (last \\boxed{...}, else the response) equals the reference after normalisation"


def last_number(text: str) -> float | None:
    found = NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the pattern only matches numbers
        return None


class NumericMatch(Component):
    kind = "numeric_match"
    needs_reference = True
    params = {"rel_tol": (int, float), "abs_tol": (int, float)}

    def __init__(self, name: str, rel_tol: float = 1e-6, abs_tol: float = 1e-9, **kw: Any) -> None:
        super().__init__(name, rel_tol=rel_tol, abs_tol=abs_tol, **kw)
        if not (0 <= rel_tol < 1 and 0 <= abs_tol and math.isfinite(abs_tol)):
            raise ConfigError(f"component {name!r}: rel_tol in [0, 1) and abs_tol >= 0, got {rel_tol}, {abs_tol}")
        self.rel_tol, self.abs_tol = float(rel_tol), float(abs_tol)

    def score(self, response: str, reference: str | None) -> float:
        if reference is None:
            raise ComponentError("needs a reference (items[i].reference, or OpenRLHF labels)")
        want = last_number(answer_part(reference))
        if want is None:
            raise ComponentError(f"the reference has no number: {reference[:80]!r}")
        got = last_number(answer_part(response))
        if got is None:
            return 0.0
        return 1.0 if math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=self.abs_tol) else 0.0

    def describe(self) -> str:
        return (f"1 if the answer's last number is within rel_tol={self.rel_tol:g} / abs_tol={self.abs_tol:g} of "
                "the reference's")

    def config(self) -> dict[str, Any]:
        return {"rel_tol": self.rel_tol, "abs_tol": self.abs_tol}


KINDS: dict[str, type[Component]] = {c.kind: c for c in (LengthPenalty, Regex, ExactMatch, NumericMatch)}
BUILTIN = {"exact_match": "exact_match", "numeric_match": "numeric_match"}  # served with no configuration


def parse_component_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=KIND[:JSON]`` -> (name, kind, params), with errors that say how to write it."""
    name, sep, rest = spec.partition("=")
    if not sep or not NAME_RE.match(name):
        raise ConfigError(f"component {spec!r}: expected NAME=KIND[:JSON] with NAME matching {NAME_RE.pattern}, "
                          "e.g. concise=length_penalty:{\"limit\": 400}")
    kind, _, raw = rest.partition(":")
    if kind not in KINDS:
        raise ConfigError(f"component {name!r}: unknown kind {kind!r}; one of {sorted(KINDS)}")
    params: Any = {}
    if raw.strip():
        try:
            params = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"component {name!r}: parameters are not JSON ({exc}): {raw!r}") from None
        if not isinstance(params, dict):
            raise ConfigError(f"component {name!r}: parameters must be a JSON object, got {raw!r}")
    return name, kind, params


def build_components(specs: list[str]) -> dict[str, Component]:
    """The built-ins (exact_match, numeric_match with their defaults) plus the configured ones, which may reuse
    a built-in's name to change its parameters."""
    out: dict[str, Component] = {name: KINDS[kind](name) for name, kind in BUILTIN.items()}
    seen: set[str] = set()
    for spec in specs:
        name, kind, params = parse_component_spec(spec)
        if name in seen:
            raise ConfigError(f"component {name!r} is configured twice")
        seen.add(name)
        out[name] = KINDS[kind](name, **params)
    return out
