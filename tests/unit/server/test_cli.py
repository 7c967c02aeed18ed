"""``rewardkit serve``: flags map onto Settings (flags override env vars; absent flags leave the defaults), and what
a new user meets when something is wrong: one clear line and a non-zero exit, at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from rewardkit.cli import build_parser
from rewardkit.server.cli import settings_from_args
from tests.helpers import free_port


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


# --- first contact: failures say what to fix, at once, with a non-zero exit -------------------------------------
def _serve(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rewardkit.cli", "serve", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent/rm"], "--model /nonexistent/rm: no such directory"),
    (["--model", "runs-that-do-not-exist/bt"], "no such"),
    (["--model", "org/not-here"], "HF_HUB_OFFLINE is set"),
    (["--device", "gpu"], "--device 'gpu': must be auto, cpu, cuda, cuda:N or mps"),
    (["--max-batch-size", "0"], "setting max_batch_size (--max-batch-size / REWARDKIT_MAX_BATCH_SIZE)"),
    (["--replicas", "2"], "--replicas: these flags need --ray"),
    (["--ray", "--replicas", "0"], "replicas: expected a count >= 1 or 'auto', got 0"),
    (["--ray", "--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"], "max_replicas must be >="),
    (["--ray", "--model", "/nonexistent/rm"], "--model /nonexistent/rm: no such directory"),
    (["--ray", "--num-gpus", "-1"], "num_gpus and num_cpus must be >= 0"),
])
def test_bad_configuration_exits_at_once_with_one_clear_line(argv: list[str], message: str) -> None:
    r = _serve(*argv)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_directory_without_a_model(tmp_path: Path) -> None:
    r = _serve("--model", str(tmp_path))
    assert r.returncode == 2 and "no reward model in this directory: expected rewardkit.json" in r.stderr


def test_every_bad_setting_gets_its_own_line() -> None:
    r = _serve("--max-batch-size", "0", env={"REWARDKIT_MAX_LENGTH": "2"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 2
    assert any("setting max_length" in x and "REWARDKIT_MAX_LENGTH" in x for x in lines)


def test_port_in_use_is_refused_before_the_model_loads() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _serve("--port", str(port), timeout=30)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in r.stderr
    assert "loaded model" not in r.stderr


@pytest.mark.slow
def test_a_model_that_fails_to_load_exits_non_zero(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # passes the path check, fails in transformers
    r = _serve("--model", str(tmp_path), "--port", str(free_port()))
    assert r.returncode == 1
    assert "error: the model could not be loaded: cannot load reward model" in r.stderr


@pytest.mark.slow
def test_stay_up_on_load_failure_says_why_in_ready(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rewardkit.cli", "serve", "--model", str(tmp_path), "--port",
                             str(port)], env={**os.environ, "HF_HUB_OFFLINE": "1",
                                              "REWARDKIT_EXIT_ON_LOAD_FAILURE": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if "failed to load" in r.text:
                    body = r
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert body is not None and body.status_code == 503
        assert body.json()["error"]["message"].startswith("model failed to load: cannot load reward model")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_help_imports_no_model_stack() -> None:
    """`rewardkit --help` used to take 5-6 s importing torch; the CLI must import torch only when a command runs."""
    code = ("import sys, rewardkit.cli; rewardkit.cli.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'fastapi')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["train", "bt"], ["train", "idrm"], ["score"], ["bench"], ["eval"], ["serve"]])
def test_help_reads_well(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """No reStructuredText backticks in --help, and trainer flags grouped as their config reads."""
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    if argv[0] == "train":
        heads = [line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
        assert heads[-4:] == (["model", "data", "optimisation", "runtime"] if argv[1] == "bt" else
                              ["data", "optimisation", "runtime", "Id-RM"])


def test_default_head_preset_never_overwrites_the_packaged_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from rewardkit.core.loading import DEFAULT_HEAD_DIR
    from rewardkit.training import cli as tcli

    seen: dict[str, str] = {}

    def fake(cfg: object, command: str) -> dict[str, str]:
        seen["out"] = cfg.output_dir  # type: ignore[attr-defined]
        return {}

    monkeypatch.setitem(tcli.TRAINERS, "bt", (tcli.TRAINERS["bt"][0], tcli.TRAINERS["bt"][1], fake))
    for argv, want in ((["--default-head"], "runs/default-head"),
                       (["--default-head", "--output-dir", "x/y"], "x/y"),
                       (["--default-head", "--force"], str(DEFAULT_HEAD_DIR))):
        args = build_parser().parse_args(["train", "bt", *argv])
        assert args.func(args) == 0
        assert seen["out"] == want, argv
    args = build_parser().parse_args(["train", "bt", "--force", "--output-dir", "z"])
    assert args.func(args) == 2


@pytest.mark.slow
def test_a_checkpoint_with_a_bad_rewardkit_json_names_the_field(tmp_path: Path) -> None:
    """Issue 16 #11: wrong field types were a bare TypeError; an unknown head_kind was accepted."""
    import json

    for patch, message in (({"norm_std": "1.0"}, "field 'norm_std' must be"),
                           ({"head_kind": "mystery"}, "head_kind 'mystery'")):
        d = tmp_path / next(iter(patch))
        d.mkdir()
        (d / "rewardkit.json").write_text(json.dumps({"backbone": "embedded:smollm2", "model_id": "m", **patch}))
        r = _serve("--model", str(d), "--port", str(free_port()))
        assert r.returncode == 1 and message in r.stderr, r.stderr[-500:]
        assert "TypeError" not in r.stderr


def test_several_models_components_and_default_rewards_reach_settings() -> None:
    s = settings_from_args(_args(["--model", "a=/m/a", "--model", "b=/m/b", "--model", "c=/m/c",
                                 "--component", 'short=length_penalty:{"limit": 5}',
                                 "--default-rewards", "a=1,short=0.5"]))
    assert (s.model, s.model_name) == ("/m/a", "a")
    assert s.extra_models == {"b": "/m/b", "c": "/m/c"}
    assert s.components == ['short=length_penalty:{"limit": 5}']
    assert s.default_rewards == {"a": 1.0, "short": 0.5}
    from rewardkit.server.cli import SettingsError

    with pytest.raises(SettingsError, match="given twice"):
        settings_from_args(_args(["--model", "/m/a", "--model", "b=/m/b", "--model", "b=/m/c"]))
    with pytest.raises(SettingsError, match="default_rewards"):
        settings_from_args(_args(["--model", "/m/a", "--default-rewards", "nosuch=1"]))
