"""``rewardkit serve --ray`` for real: a local Ray instance, two Serve replicas of a tiny model (and a second tiny
model, ``--model gpt2=...``) on CPU, a real redis-server. Every request answered, both replicas used, both models on
each replica, a killed replica replaced under load, the one R2M updater
publishing a head that every replica serves, SIGTERM leaving nothing running."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewardkit.client import RewardClient
from rewardkit.client.feedback import FeedbackStream, r2m_rewards
from tests.helpers import RedisProcess, ServerProcess

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rewardkit[ray]')")
pytestmark = [pytest.mark.slow, pytest.mark.redis]

D_P = 12
ENV = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(D_P), "REWARDKIT_R2M_D_ATTN": "8", "REWARDKIT_R2M_LR": "0.01",
       "REWARDKIT_R2M_GROUP_SIZE": "4", "REWARDKIT_R2M_TOTAL_ROUNDS": "10", "REWARDKIT_DRIFT_ENABLED": "false"}
ITEM = {"prompt": "What is 3+4?", "response": "7"}


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below ``pid`` (Ray's raylet, GCS, workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    cmd: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd[int(d)] = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = cmd.get(c, "")
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def replica_pids(server: ServerProcess, deployment: str = "RewardReplica") -> list[int]:
    assert server.proc is not None
    return sorted(p for p, c in descendants(server.proc.pid).items()
                  if f"ServeReplica:rewardkit:{deployment}" in c)


def replicas_seen(url: str, n: int = 24) -> Counter[str]:
    with httpx.Client(timeout=30) as c:
        return Counter(c.post(url + "/v1/rewards", json={"items": [ITEM]}).headers["x-rewardkit-replica"]
                       for _ in range(n))


def wait_until(pred, timeout: float = 60.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.25)
    raise AssertionError(f"not reached within {timeout}s: {what}")


@pytest.fixture(scope="module")
def ray_server(tiny_llama_dir: Path, tiny_gpt2_dir: Path, redis_proc: RedisProcess,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("ray")
    srv = ServerProcess(tiny_llama_dir, tmp, "--model", f"gpt2={tiny_gpt2_dir}", "--ray", "--replicas", "2",
                        "--redis-url", redis_proc.url, "--max-length", "128", env=ENV)
    srv.start(timeout=240)
    wait_until(lambda: len(replicas_seen(srv.url, 12)) == 2, what="both replicas answering")
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


def test_every_request_answered_by_both_replicas(ray_server: ServerProcess) -> None:
    items = [{"prompt": f"Q{i}", "response": f"answer {i}"} for i in range(6)]
    got: list[tuple[str, list[float]]] = []

    def one() -> None:
        r = httpx.post(ray_server.url + "/v1/rewards", json={"items": items}, timeout=60)
        assert r.status_code == 200, r.text
        got.append((r.headers["x-rewardkit-replica"], r.json()["rewards"]))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got) == 24
    by_replica = Counter(name for name, _ in got)
    assert len(by_replica) == 2, by_replica
    for _, rewards in got:  # every replica runs the same model: the same rewards
        assert rewards == pytest.approx(got[0][1], rel=1e-5)
    r = httpx.get(ray_server.url + "/no-such-route", timeout=10)  # errors carry the header too
    assert r.status_code == 404 and r.headers["x-rewardkit-replica"] in by_replica


def test_every_replica_serves_every_model(ray_server: ServerProcess) -> None:
    """Two models (``--model`` twice) under Ray Serve: each replica loads both; a request for the second model, and a
    composition of both, gets the same answer from either replica."""
    items = [{"prompt": f"Q{i}", "response": f"answer {i}"} for i in range(4)]
    body = {"items": items, "rewards": {"default": 1.0, "gpt2": 0.5}}
    got: dict[str, tuple[list[float], list[float]]] = {}
    with httpx.Client(timeout=60) as c:
        names = [m["id"] for m in c.get(ray_server.url + "/v1/models").json()["data"]]
        assert len(names) == 2, names  # both models listed
        for _ in range(24):
            solo = c.post(ray_server.url + "/v1/rewards", json={"items": items, "model": "gpt2"})
            both = c.post(ray_server.url + "/v1/rewards", json=body)
            assert solo.status_code == 200 and both.status_code == 200, (solo.text, both.text)
            got[solo.headers["x-rewardkit-replica"]] = (solo.json()["rewards"], both.json()["rewards"])
    assert len(got) == 2, got.keys()
    (s1, b1), (s2, b2) = got.values()
    assert s1 == pytest.approx(s2, rel=1e-5) and b1 == pytest.approx(b2, rel=1e-5)
    first = httpx.post(ray_server.url + "/v1/rewards", json={"items": items}, timeout=60).json()["rewards"]
    assert b1 == pytest.approx([f + 0.5 * s for f, s in zip(first, s1, strict=True)], rel=1e-4, abs=1e-5)


def test_one_r2m_updater_and_its_head_served_by_every_replica(ray_server: ServerProcess) -> None:
    assert len(replica_pids(ray_server, "R2MUpdater")) == 1
    statuses = [httpx.get(ray_server.url + "/v1/r2m/status", timeout=10).json() for _ in range(8)]
    assert not any(s["updater_running"] for s in statuses)  # replicas only ingest
    rng = np.random.default_rng(0)
    with FeedbackStream(ray_server.url) as fs:  # lands on whichever replica the router picks
        for i in range(4):
            fs.add("ray-group", i, 3, rng.normal(size=(5 + i, D_P)).astype(np.float32),
                   {"prompt": "Prompt ray", "response": f"response {i} " * (i + 1)})

    def every_replica_on_new_head() -> bool:
        seen: dict[str, str] = {}
        for _ in range(12):
            r = httpx.get(ray_server.url + "/v1/r2m/heads", timeout=10)
            seen[r.headers["x-rewardkit-replica"]] = r.json()["active"]
        return len(seen) == 2 and all(v != "r2m-000000" for v in seen.values()) and len(set(seen.values())) == 1

    wait_until(every_replica_on_new_head, timeout=90, what="the updater's head on both replicas")
    hid = [rng.normal(size=(4, D_P)) for _ in range(2)]
    items = [{"prompt": "Q", "response": "yes"}, {"prompt": "Q", "response": "no"}]
    results = [r2m_rewards(ray_server.url, ["p", "p"], [0, 1], 3, hid, items, dtype="float32") for _ in range(6)]
    assert len({r["head_version"] for r in results}) == 1
    for r in results:
        assert r["rewards"] == pytest.approx(results[0]["rewards"], rel=1e-5, abs=1e-6)


def test_killed_replica_is_replaced_under_load(ray_server: ServerProcess) -> None:
    before = set(replicas_seen(ray_server.url))
    pids = replica_pids(ray_server)
    assert len(before) == 2 and len(pids) == 2
    stop = threading.Event()
    raw_status: Counter[int | str] = Counter()
    client_ok: list[float] = []
    client_err: list[BaseException] = []
    items = [{"prompt": f"load {i}", "response": "x " * 40} for i in range(8)]

    def raw() -> None:  # no retries: what Serve answers while the replica dies
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                try:
                    raw_status[c.post(ray_server.url + "/v1/rewards", json={"items": items}).status_code] += 1
                except httpx.HTTPError as exc:
                    raw_status[type(exc).__name__] += 1

    def client() -> None:  # the trainer's view: retries 503 within its budget
        with RewardClient(ray_server.url, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    c.score(items=items)
                    client_ok.append(time.monotonic() - t0)
                except Exception as exc:  # noqa: BLE001  # recorded and asserted below
                    client_err.append(exc)

    threads = [threading.Thread(target=f) for f in (raw, raw, client, client)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    os.kill(pids[0], signal.SIGKILL)
    try:
        wait_until(lambda: not alive(pids[0]), timeout=10, what="the replica process gone")
        wait_until(lambda: len(set(replica_pids(ray_server)) - set(pids)) == 1, timeout=120,
                   what="a new replica process")
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    print(f"raw statuses {dict(raw_status)}; client calls ok {len(client_ok)}, slowest {max(client_ok, default=0):.2f} s")
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not client_err, client_err[:3]
    assert client_ok and max(client_ok) < 60
    assert set(raw_status) <= {200, 503}, raw_status  # never a 500, never a dropped connection
    wait_until(lambda: len((now := set(replicas_seen(ray_server.url))) - before) == 1 and len(now) == 2,
               timeout=120, what="the replacement answering beside the survivor")


def test_sigterm_shuts_everything_down(ray_server: ServerProcess) -> None:
    assert ray_server.proc is not None
    procs = descendants(ray_server.proc.pid)
    assert any("raylet" in c for c in procs.values()) and len(replica_pids(ray_server)) == 2
    ray_server.signal(signal.SIGTERM)
    assert ray_server.proc.wait(timeout=90) == 0, ray_server.logs()[-3000:]
    wait_until(lambda: not any(alive(p) for p in procs), timeout=30,
               what=f"Ray processes gone: {[c[:80] for p, c in procs.items() if alive(p)]}")
    assert "shutdown complete (ray)" in ray_server.logs()
