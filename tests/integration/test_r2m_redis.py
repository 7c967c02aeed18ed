"""R2M over HTTP against the real server process and a real redis-server: stream feedback with the client, see
new head versions, score with them, kill -9 the server mid-run and restart: nothing lost, nothing applied twice."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from rewardkit.client.feedback import FeedbackStream, r2m_rewards
from tests.helpers import RedisProcess, ServerProcess, free_port, require_redis

pytestmark = [pytest.mark.slow, pytest.mark.redis]

D_P = 12
ENV = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(D_P), "REWARDKIT_R2M_D_ATTN": "8", "REWARDKIT_R2M_LR": "0.01",
       "REWARDKIT_R2M_GROUP_SIZE": "4", "REWARDKIT_R2M_TOTAL_ROUNDS": "10"}


def _heads(url: str) -> dict:
    return httpx.get(url + "/v1/r2m/heads", timeout=10).json()


def _wait(pred, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _send(fs: FeedbackStream, group: str, indices: range, rnd: int = 3) -> None:
    rng = np.random.default_rng(abs(hash(group)) % 2**32)
    for i in indices:
        fs.add(group, i, rnd, rng.normal(size=(5 + i, D_P)).astype(np.float32),
               {"prompt": f"Prompt {group}", "response": f"response {i} " * (i + 1)})


def _applied_groups(url: str) -> list[int]:
    return [h["groups"] for h in _heads(url)["heads"]]


def test_stream_score_kill9_restart_exactly_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    require_redis()
    with RedisProcess(tmp_path) as rp:
        port = free_port()
        srv = ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128", env=ENV,
                            port=port).start()
        try:
            with FeedbackStream(srv.url, dtype="bfloat16", batch_frames=5) as fs:
                for g in ("a", "b", "c"):
                    _send(fs, g, range(4))
                fs.flush(complete_groups=False)
            _wait(lambda: sum(_applied_groups(srv.url)) == 3)
            active = _heads(srv.url)["active"]
            assert active != "r2m-000000"
            rng = np.random.default_rng(0)
            out = r2m_rewards(srv.url, ["p", "p"], [0, 1], 3, [rng.normal(size=(4, D_P)) for _ in range(2)],
                              [{"prompt": "Q", "response": "yes"}, {"prompt": "Q", "response": "no"}])
            assert out["head_version"] == active and len(out["rewards"]) == 2
            assert all(np.isfinite(out["rewards"]))
            # three of four members of group "d" are accepted, then the server dies without warning
            with FeedbackStream(srv.url, batch_frames=8) as fs:
                _send(fs, "d", range(3))
            # wait until the updater holds them (delivered to its consumer, not acknowledged), then kill
            _wait(lambda: httpx.get(srv.url + "/v1/r2m/status", timeout=10).json()["pending_frames"] == 3)
            srv.signal(signal.SIGKILL)
            srv.proc.wait()  # type: ignore[union-attr]
        finally:
            srv.stop()
        r = redis.Redis.from_url(rp.url)
        stream = next(k for k in r.scan_iter(match="*:r2m:*:feedback"))
        assert r.xpending(stream, "r2m-updater")["pending"] == 3  # delivered to the updater, never acknowledged

        srv2 = ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128", env=ENV,
                             port=port).start()  # same port -> same state dir
        try:
            assert _heads(srv2.url)["active"] == active  # the active head survived
            with FeedbackStream(srv2.url) as fs:
                _send(fs, "d", range(3, 4))  # the last member arrives after the restart
                _send(fs, "a", range(4))  # a client retry of an applied group: must not apply again
            _wait(lambda: sum(_applied_groups(srv2.url)) == 4)
            time.sleep(1.0)  # give a wrong second application of "a" time to show up
            heads = _heads(srv2.url)["heads"]
            assert sum(h["groups"] for h in heads) == 4  # a, b, c, d: each once
            _wait(lambda: r.xpending(stream, "r2m-updater")["pending"] == 0)
            assert r.xlen(stream) == 0  # acknowledged and deleted
        finally:
            srv2.stop()


def test_fleet_ingest_anywhere_one_updater_heads_reach_every_replica(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Replica B only ingests (REWARDKIT_R2M_UPDATER=false); A's updater consumes the shared stream and publishes;
    B installs the published head and scores with it, with the same weights."""
    require_redis()
    with RedisProcess(tmp_path) as rp:
        a = ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128", env=ENV).start()
        b = ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128",
                          env={**ENV, "REWARDKIT_R2M_UPDATER": "false"}).start()
        try:
            assert httpx.get(b.url + "/v1/r2m/status").json()["updater_running"] is False
            with FeedbackStream(b.url) as fs:  # sent to the replica without an updater
                _send(fs, "fleet", range(4))
            _wait(lambda: _heads(a.url)["active"] != "r2m-000000")
            new = _heads(a.url)["active"]
            _wait(lambda: _heads(b.url)["active"] == new)  # published through Redis, installed on B
            rng = np.random.default_rng(1)
            hid = [rng.normal(size=(4, D_P)) for _ in range(2)]
            items = [{"prompt": "Q", "response": "yes"}, {"prompt": "Q", "response": "no"}]
            ra = r2m_rewards(a.url, ["p", "p"], [0, 1], 3, hid, items, dtype="float32")
            rb = r2m_rewards(b.url, ["p", "p"], [0, 1], 3, hid, items, dtype="float32")
            assert ra["head_version"] == rb["head_version"] == new
            assert rb["rewards"] == pytest.approx(ra["rewards"], rel=1e-5, abs=1e-6)  # the same weights
        finally:
            b.stop()
            a.stop()


def test_redis_back_empty_the_updater_recreates_its_group(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Issue 16 #3: Redis that came back empty (FLUSHALL, a restart without persistence) left the updater looping on
    NOGROUP while feedback still got 200 and was never trained."""
    require_redis()
    with RedisProcess(tmp_path) as rp:
        with ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128", env=ENV) as srv:
            with FeedbackStream(srv.url, batch_frames=8) as fs:
                _send(fs, "before", range(4))
                fs.flush(complete_groups=False)
            _wait(lambda: sum(_applied_groups(srv.url)) == 1)
            redis.Redis.from_url(rp.url).flushall()  # stream and consumer group gone
            with FeedbackStream(srv.url, batch_frames=8) as fs:
                _send(fs, "after", range(4))
                fs.flush(complete_groups=False)
            _wait(lambda: sum(_applied_groups(srv.url)) == 2, timeout=30)
            assert "recreating it" in srv.logs()


class UpdaterProcess:
    """``rewardkit r2m-updater`` as a subprocess (issue 22: the updater apart from the servers)."""

    def __init__(self, model: Path, tmp: Path, redis_url: str, state_dir: Path, cpus: str = "") -> None:
        import os
        import subprocess
        import sys

        self.log_path = tmp / f"updater-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        cmd = [sys.executable, "-m", "rewardkit.cli", "r2m-updater", "--model", str(model), "--redis-url", redis_url,
               "--state-dir", str(state_dir)] + (["--cpus", cpus] if cpus else [])
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **ENV, "HF_HUB_OFFLINE": "1"})

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def test_updater_in_its_own_process_kill9_loses_nothing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The server only ingests and scores (REWARDKIT_R2M_UPDATER=false); `rewardkit r2m-updater`, pinned to a
    CPU, consumes the stream and publishes heads that the server installs. kill -9 of the updater while it works
    through a backlog, then a restart: every group sent is applied exactly once."""
    from rewardkit.core.r2m import read_head_metadata

    require_redis()
    with RedisProcess(tmp_path) as rp:
        srv = ServerProcess(tiny_llama_dir, tmp_path, "--redis-url", rp.url, "--max-length", "128",
                            env={**ENV, "REWARDKIT_R2M_UPDATER": "false", "REWARDKIT_R2M_KEEP_VERSIONS": "0"}).start()
        state = tmp_path / f"state-{srv.port}"  # the server's store: one host, one directory
        up = UpdaterProcess(tiny_llama_dir, tmp_path, rp.url, state, cpus="0")
        try:
            assert httpx.get(srv.url + "/v1/r2m/status").json()["updater_running"] is False
            with FeedbackStream(srv.url) as fs:
                _send(fs, "solo-0", range(4))
            _wait(lambda: _heads(srv.url)["active"] != "r2m-000000", 60)  # published by the process, installed here
            with FeedbackStream(srv.url) as fs:
                for g in range(1, 13):
                    _send(fs, f"solo-{g}", range(4))
            time.sleep(0.3)
            assert up.stop(signal.SIGKILL) == -signal.SIGKILL  # mid-backlog, most likely
            up = UpdaterProcess(tiny_llama_dir, tmp_path, rp.url, state)
            with FeedbackStream(srv.url) as fs:
                _send(fs, "solo-13", range(4))

            def applied() -> list[str]:
                out: list[str] = []
                for p in sorted((state / "r2m").rglob("r2m-*.safetensors")):
                    out += (read_head_metadata(p).get("extra") or {}).get("applied", [])
                return out

            _wait(lambda: len(set(applied())) == 14, 90)
            keys = applied()
            assert sorted(keys) == sorted(set(keys)), "a group applied twice"
            assert {k.split(":", 1)[1] for k in keys} == {f"solo-{g}" for g in range(14)}
            newest = _heads(srv.url)["heads"][-1]["version"] if _heads(srv.url)["heads"] else None
            _wait(lambda: _heads(srv.url)["active"] == newest, 30)
            assert "r2m-updater running" in up.logs() and "cpus=[0]" in open(tmp_path / sorted(
                p.name for p in tmp_path.glob("updater-*.log"))[0]).read()
        finally:
            up.stop()
            srv.stop()
