"""Every curl example in README.md and docs/*.md runs as written against a real server (only the port changes)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def curl_commands(text: str) -> list[str]:
    """The curl commands of a markdown text's bash blocks: a line starting with `curl`, plus its continuation lines
    (a trailing backslash, or an unclosed single quote)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].lstrip().startswith("curl "):
                i += 1
                continue
            cmd = [lines[i]]
            while (cmd[-1].rstrip().endswith("\\") or "".join(cmd).count("'") % 2) and i + 1 < len(lines):
                i += 1
                cmd.append(lines[i])
            out.append("\n".join(cmd))
            i += 1
    return out


def test_the_doc_parser_finds_the_examples() -> None:
    cmds = [c for d in DOCS for c in curl_commands(d.read_text())]
    assert len(cmds) >= 9, cmds  # README: rewards, dense, models, health/ready, get_reward, pooling, classify, ...
    assert any("/classify" in c for c in cmds) and any('"dense": true' in c for c in cmds)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """Served as docs/team.md's composition example is: two models by name and its components."""
    args = ("--model", f"math={tiny_gpt2_dir}", "--component", 'concise=length_penalty:{"limit": 800}',
            "--component", 'think=regex:{"pattern": "<think>.*</think>", "flags": "s"}')
    with ServerProcess(f"helpful={tiny_llama_dir}", tmp_path_factory.mktemp("docs"), *args) as srv:
        yield srv


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_curl_examples_run_as_written(server: ServerProcess, doc: Path) -> None:
    for cmd in curl_commands(doc.read_text()):
        run = cmd.replace("localhost:8000", f"127.0.0.1:{server.port}").replace("curl ", "curl --fail-with-body ")
        r = subprocess.run(["bash", "-c", "set -o pipefail; " + run], capture_output=True, text=True, timeout=60)
        ok = r.returncode == 0 or (r.returncode == 23 and "|" in cmd)  # 23: `| head` closed the pipe early
        assert ok, f"{doc.name}: {cmd}\n-> exit {r.returncode}: {r.stdout[-500:]} {r.stderr[-500:]}"
        assert r.stdout.strip(), f"{doc.name}: {cmd} printed nothing"
