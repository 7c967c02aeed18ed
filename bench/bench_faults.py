"""Fault injection on the R2M feedback path (issue 16): a real server process, a real redis-server, real signals.

Phases, one server and one Redis throughout (the server restarts once):

1. ``baseline``: groups sent with nothing wrong.
2. ``redis_paused``: redis-server stopped with SIGSTOP for ``--pause-s`` seconds while groups are sent, then SIGCONT.
3. ``redis_killed``: redis-server killed (SIGKILL), groups sent while it is down, then restarted *empty* on the same
   port (its data directory removed, as a restart without persistence or a failover to an empty replica), and more
   groups sent.
4. ``redis_flushall``: ``FLUSHALL`` between two bursts (the stream and the updater's consumer group are gone).
5. ``store_unwritable``: the head store replaced by a file (root can write into a read-only directory, not into a
   file), groups sent and a flush asked for, the store put back, a flush asked for again.
6. ``server_kill9``: the server killed with SIGKILL while a sender thread streams groups and the updater applies
   them, restarted on the same port (same state directory), and the rest of the groups sent.

Before Redis loses its data (phases 3 and 4) the bench waits for the updater to apply everything accepted so far:
entries Redis held that the updater had not read are lost with Redis when it runs without persistence (use AOF),
which is a property of Redis, not of the server, and not what those phases measure.

Each group is K frames in one ``POST /v1/r2m/feedback`` and is sent once (no client retry), so every group ends as
exactly one of: *accepted* (200) or *refused* (a status, or a transport error). At the end the bench flushes, waits
for the updater to go idle, and reads the applied group keys from every head file in the store
(``r2m_keep_versions=0`` keeps them all). *lost* = accepted but never applied; *duplicated* = applied by more than one
head version; *applied_though_refused* = the client saw a failure but the frames got in (a timeout after the server
accepted, for instance): counted, not lost.

    python bench/bench_faults.py --json bench/results/faults.json

Exit status 1 if anything accepted was lost or applied twice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import RedisProcess, ServerProcess, free_port  # noqa: E402

D_P = 12
K = 4
OCTET = {"content-type": "application/octet-stream"}


class Ledger:
    """What the client saw for each group, per phase."""

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}
        self.lock = threading.Lock()

    def record(self, phase: str, gid: str, outcome: str) -> None:
        with self.lock:
            self.groups[gid] = {"phase": phase, "outcome": outcome}


def frames(gid: str, members: range = range(K), rnd: int = 1) -> bytes:
    from rewardkit.core.wire import encode_stream

    rng = np.random.default_rng(abs(hash(gid)) % 2**32)
    out = []
    for i in members:
        h = {"group_id": gid, "index": i, "round": rnd, "prompt": f"question {gid}", "response": f"answer {i} " * (i + 1)}
        out.append((h, rng.normal(size=(4 + i, D_P)).astype(np.float32), "float32"))
    return encode_stream(out)


def send_group(url: str, ledger: Ledger, phase: str, gid: str, timeout: float, members: range = range(K)) -> str:
    try:
        r = httpx.post(url + "/v1/r2m/feedback", content=frames(gid, members), headers=OCTET, timeout=timeout)
        outcome = "accepted" if r.status_code == 200 else f"refused {r.status_code}"
    except httpx.TimeoutException:
        outcome = "refused timeout"
    except httpx.TransportError as exc:
        outcome = f"refused {type(exc).__name__}"
    ledger.record(phase, gid, outcome)
    return outcome


def flush(url: str, timeout: float = 60.0) -> tuple[int, str]:
    try:
        r = httpx.post(url + "/v1/r2m/feedback?flush=true", content=b"RKF1", headers=OCTET, timeout=timeout)
        return r.status_code, r.text[:200]
    except httpx.HTTPError as exc:
        return -1, str(exc)


def status(url: str) -> dict:
    return httpx.get(url + "/v1/r2m/status", timeout=10).json()


def wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def burst(url: str, ledger: Ledger, phase: str, n: int, timeout: float = 10.0) -> Counter:
    start = len([g for g in ledger.groups if g.startswith(phase)])
    return Counter(send_group(url, ledger, phase, f"{phase}-{start + i}", timeout) for i in range(n))


def settle(url: str, ledger: Ledger, timeout: float = 30.0) -> bool:
    """Wait until the updater has applied every group accepted so far and holds no frames. Run before Redis
    loses its data (kill + empty restart, FLUSHALL): what Redis held and the updater had not read yet is lost with
    it (Redis without persistence; docs/operations.md), which is not what those phases measure."""
    accepted = sum(1 for v in ledger.groups.values() if v["outcome"] == "accepted")

    def done() -> bool:
        st = status(url)
        return st["groups_applied"] >= accepted and st["pending_frames"] == 0

    return wait(done, timeout)


def applied_keys(store_root: Path) -> Counter:
    """Group keys in every head file (``round:group_id``), counted per file: > 1 means applied twice."""
    from rewardkit.core.r2m import read_head_metadata

    c: Counter = Counter()
    for p in sorted(store_root.rglob("r2m-*.safetensors")):
        extra = read_head_metadata(p).get("extra") or {}
        c.update(extra.get("applied", ()))
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=12, help="groups per burst")
    ap.add_argument("--pause-s", type=float, default=3.0)
    ap.add_argument("--kills", type=int, default=3, help="kill -9 cycles of the server")
    ap.add_argument("--json", default="bench/results/faults.json")
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args()
    from rewardkit.core.testing import make_tiny_reward_model

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="rk-faults-"))
    model = make_tiny_reward_model(tmp / "tiny", arch="llama")
    env = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(D_P), "REWARDKIT_R2M_D_ATTN": "8", "REWARDKIT_R2M_LR": "0.01",
           "REWARDKIT_R2M_GROUP_SIZE": str(K), "REWARDKIT_R2M_TOTAL_ROUNDS": "10", "REWARDKIT_R2M_KEEP_VERSIONS": "0"}
    ledger = Ledger()
    events: list[dict] = []
    n = a.groups

    def note(phase: str, what: str, **kw: object) -> None:
        events.append({"phase": phase, "t": round(time.time() - t0, 2), "event": what, **kw})
        print(f"[{time.time() - t0:6.1f}s] {phase}: {what} {kw if kw else ''}", flush=True)

    rp = RedisProcess(tmp).start()
    port = free_port()
    args = ("--redis-url", rp.url, "--max-length", "128")
    srv = ServerProcess(model, tmp, *args, env=env, port=port).start()
    url = srv.url
    store_root = tmp / f"state-{port}"
    try:
        note("baseline", "sent", **burst(url, ledger, "baseline", n))

        # -- Redis paused ---------------------------------------------------------------------------------------
        assert rp.proc is not None
        rp.proc.send_signal(signal.SIGSTOP)
        t = threading.Timer(a.pause_s, lambda: rp.proc.send_signal(signal.SIGCONT))  # type: ignore[union-attr]
        t.start()
        note("redis_paused", "sent during the pause", **burst(url, ledger, "redis_paused", n, timeout=a.pause_s + 10))
        t.join()
        note("redis_paused", "sent after SIGCONT", **burst(url, ledger, "redis_paused", n))

        # -- Redis killed, restarted empty ----------------------------------------------------------------------
        note("redis_paused", "updater caught up before the kill", settled=settle(url, ledger))
        rp.kill()
        note("redis_killed", "sent while Redis is down", **burst(url, ledger, "redis_killed", n))
        shutil.rmtree(rp.dir)
        rp.dir.mkdir()
        rp.start()
        time.sleep(1.0)
        note("redis_killed", "sent after an empty restart", **burst(url, ledger, "redis_killed", n))

        # -- FLUSHALL -------------------------------------------------------------------------------------------
        import redis

        note("redis_flushall", "sent before", **burst(url, ledger, "redis_flushall", n))
        note("redis_flushall", "updater caught up before FLUSHALL", settled=settle(url, ledger))
        redis.Redis.from_url(rp.url).flushall()
        note("redis_flushall", "sent after FLUSHALL", **burst(url, ledger, "redis_flushall", n))

        # -- head store unwritable ------------------------------------------------------------------------------
        wait(lambda: status(url)["pending_frames"] == 0, 30)
        store = next((store_root / "r2m").iterdir())
        aside = store.with_name(store.name + ".aside")
        store.rename(aside)
        store.write_text("not a directory")
        try:
            note("store_unwritable", "sent", **burst(url, ledger, "store_unwritable", n))
            code, text = flush(url)
            note("store_unwritable", "flush while unwritable", status=code, body=text[:120])
        finally:
            store.unlink()
            aside.rename(store)
        code, _ = flush(url)
        note("store_unwritable", "flush after the store is back", status=code)

        # -- server kill -9 during updates, --kills times at random moments ------------------------------------------
        # Every third group is sent as K-1 members before the kill (the updater holds them, delivered and not
        # acknowledged) and its last member after the restart.
        rng = np.random.default_rng(0)
        for cycle in range(a.kills):
            stop = threading.Event()
            partial: list[str] = []

            def sender(cycle: int = cycle, stop: threading.Event = stop, partial: list[str] = partial) -> None:
                i = 0
                while not stop.is_set():
                    gid = f"server_kill9-{cycle}-{i}"
                    if i % 3 == 2:
                        if send_group(url, ledger, "server_kill9", gid, 5.0, range(K - 1)) == "accepted":
                            partial.append(gid)
                    else:
                        send_group(url, ledger, "server_kill9", gid, 5.0)
                    i += 1
                    time.sleep(0.02)

            th = threading.Thread(target=sender)
            th.start()
            time.sleep(float(rng.uniform(0.5, 2.0)))
            srv.signal(signal.SIGKILL)
            assert srv.proc is not None
            srv.proc.wait()
            stop.set()
            th.join()
            srv.stop()
            srv = ServerProcess(model, tmp, *args, env=env, port=port).start()
            done = Counter(send_group(url, ledger, "server_kill9", g, 10.0, range(K - 1, K)) for g in partial)
            c = Counter(v["outcome"] for g, v in ledger.groups.items() if g.startswith(f"server_kill9-{cycle}-"))
            note("server_kill9", f"kill {cycle + 1}: SIGKILL, restarted, last members of {len(partial)} held "
                 f"groups sent", last_members=dict(done), **c)

        # -- drain ----------------------------------------------------------------------------------------------
        code, _ = flush(url)
        note("drain", "final flush", status=code)
        wait(lambda: status(url)["pending_frames"] == 0, 60)
        st = status(url)
        note("drain", "idle", pending_frames=st["pending_frames"], updates_applied=st.get("updates_applied"))
    finally:
        srv.stop()
        rp.stop()

    applied = applied_keys(store_root)
    per_phase: dict[str, Counter] = {}
    for gid, v in ledger.groups.items():
        c = per_phase.setdefault(v["phase"], Counter())
        key = f"1:{gid}"
        acc = v["outcome"] == "accepted"
        c["sent"] += 1
        c["accepted" if acc else "refused"] += 1
        if not acc:
            c[v["outcome"]] += 1
        if applied[key]:
            c["applied"] += 1
        if acc and not applied[key]:
            c["lost"] += 1
        if applied[key] > 1:
            c["duplicated"] += 1
        if not acc and applied[key]:
            c["applied_though_refused"] += 1
    totals: Counter = Counter()
    for c in per_phase.values():
        totals.update(c)
    out = {"groups_per_burst": n, "group_size": K, "phases": {k: dict(v) for k, v in per_phase.items()},
           "total": dict(totals), "events": events, "wall_s": round(time.time() - t0, 1),
           "command": "python bench/bench_faults.py " + " ".join(sys.argv[1:])}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1, sort_keys=True))
    cols = ("sent", "accepted", "applied", "refused", "lost", "duplicated", "applied_though_refused")
    print(f"\n{'phase':<18}" + "".join(f"{c[:10]:>11}" for c in cols) + "   refusals")
    for ph, c in [*per_phase.items(), ("TOTAL", totals)]:
        why = ", ".join(f"{k[8:]}: {v}" for k, v in sorted(c.items()) if k.startswith("refused "))
        print(f"{ph:<18}" + "".join(f"{c.get(k, 0):>11}" for k in cols) + f"   {why}")
    print(f"wall {out['wall_s']} s; JSON: {a.json}")
    if a.keep_tmp:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if totals.get("lost", 0) or totals.get("duplicated", 0):
        sys.exit(1)


if __name__ == "__main__":
    main()
