"""The layering docs/architecture.md states, checked on the source: no import cycles (deferred imports included),
routers that do not import each other, modules under 800 lines, functions under 80 (declarative tables excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"core/rewardkit/core": "rewardkit.core", "server/rewardkit/server": "rewardkit.server",
            "clients/python/rewardkit/client": "rewardkit.client", "training/rewardkit/training": "rewardkit.training"}
TABLES = {("server/rewardkit/server/metrics.py", "__init__")}  # declarative: one metric definition per statement


def _modules() -> dict[str, Path]:
    mods = {}
    for rel, pkg in PACKAGES.items():
        for p in (ROOT / rel).rglob("*.py"):
            parts = [x for x in p.relative_to(ROOT / rel).with_suffix("").parts if x != "__init__"]
            mods[".".join([pkg, *parts])] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of ours that ``path`` imports anywhere (top level, functions, TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for the type checker only
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod, *(f"{mod}.{a.name}" for a in node.names)]
        out.update(t for t in targets if t in mods and t != name and not (is_pkg and t.startswith(name + ".")))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_check_sees_a_cycle() -> None:  # sanity: the checker itself can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    assert _cycles(graph) == []


def test_routers_do_not_import_each_other_and_core_not_the_server() -> None:
    mods = _modules()
    for m, p in mods.items():
        deps = _imports(m, p, mods)
        if m.endswith(".router"):
            assert not [d for d in deps if d.endswith(".router")], m
        if m.startswith("rewardkit.core"):
            assert not [d for d in deps if not d.startswith("rewardkit.core")], m


def test_module_and_function_sizes() -> None:
    for _m, p in _modules().items():
        text = p.read_text()
        rel = str(p.relative_to(ROOT))
        assert text.count("\n") <= 800, f"{rel}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (rel, node.name) not in TABLES:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                assert n <= 80, f"{rel}:{node.lineno} {node.name} is {n} lines"


def test_only_the_ray_modules_import_ray() -> None:
    """Ray is an extra: the base, serve and train installs run without it."""
    allowed = {"rewardkit.training.score_ray"}
    for name, path in _modules().items():
        if name.startswith("rewardkit.server.ray_serve") or name in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(m == "ray" or m.startswith("ray.") for m in mods), f"{name} imports {mods}"
