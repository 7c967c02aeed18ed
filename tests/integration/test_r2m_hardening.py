"""R2M hardening against a real server process (issue 16 #2, #4, #5): bounded pending feedback, a flush that always
gets through, and no silent loss when the head store cannot be written."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from rewardkit.core.wire import encode_stream
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow
D_P = 8
OCTET = {"content-type": "application/octet-stream"}


@pytest.fixture()
def server(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    env = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(D_P), "REWARDKIT_R2M_D_ATTN": "8",
           "REWARDKIT_R2M_MAX_PENDING_FRAMES": "6", "REWARDKIT_R2M_GROUP_SIZE": "4"}
    with ServerProcess(tiny_llama_dir, tmp_path, "--max-length", "64", env=env) as srv:
        srv.tmp = tmp_path  # type: ignore[attr-defined]
        yield srv


def _stream(groups: list[str], k: int, group_size: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    frames = []
    for g in groups:
        for i in range(k):
            h: dict[str, object] = {"group_id": g, "index": i, "round": 1, "prompt": f"q {g}", "response": f"a {i}"}
            if group_size is not None:
                h["group_size"] = group_size
            frames.append((h, rng.normal(size=(3, D_P)).astype(np.float32), "float32"))
    return encode_stream(frames)


def _post(srv: ServerProcess, body: bytes, flush: bool = False) -> httpx.Response:
    return httpx.post(srv.url + "/v1/r2m/feedback" + ("?flush=true" if flush else ""), content=body, headers=OCTET,
                      timeout=90)


def _status(srv: ServerProcess) -> dict:
    return httpx.get(srv.url + "/v1/r2m/status").json()


def test_pending_is_bounded_and_flush_always_works(server: ServerProcess) -> None:
    # group_size has an upper bound (10^9 used to be accepted and grow forever)
    r = _post(server, _stream(["huge"], 2, group_size=10**9))
    assert r.status_code == 422 and r.json()["error"]["field"] == "header.group_size"
    assert _post(server, _stream(["a", "b"], 2)).status_code == 200  # 4 frames pending (groups of 4 incomplete)
    r = _post(server, _stream(["c", "d"], 2))  # 4 more would hold 8 > r2m_max_pending_frames=6
    assert r.status_code == 429 and r.json()["error"]["field"] == "r2m_max_pending_frames"
    assert "Retry-After" in r.headers
    deadline = time.monotonic() + 10
    while _status(server)["pending_frames"] != 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(server)["pending_frames"] == 4
    # over the limit, a flush still goes through and applies what is pending
    r = _post(server, b"RKF1", flush=True)
    assert r.status_code == 200, r.text
    assert len(r.json()["applied_groups"]) == 2
    assert _status(server)["pending_frames"] == 0


def test_flush_that_cannot_be_written_is_503_and_keeps_the_feedback(server: ServerProcess) -> None:
    store = next((server.tmp / f"state-{server.port}" / "r2m").iterdir())  # type: ignore[attr-defined]
    assert _post(server, _stream(["g"], 2)).status_code == 200
    before = _status(server)["active"]
    aside = store.with_name(store.name + ".aside")
    store.rename(aside)
    store.write_text("not a directory")  # even root cannot write a head into a file
    try:
        r = _post(server, b"RKF1", flush=True)
        assert r.status_code == 503, r.text
        assert "feedback" in r.json()["error"]["message"] and "Retry-After" in r.headers
        st = _status(server)
        assert st["pending_frames"] == 2 and st["active"] == before  # kept, nothing switched
        # a rollback that cannot be recorded changes nothing either (it used to switch in memory and answer 500)
        r = httpx.post(server.url + f"/v1/r2m/heads/{before}/activate")
        assert r.status_code == 503, r.text
        assert _status(server)["active"] == before
    finally:
        store.unlink()
        aside.rename(store)
    r = _post(server, b"RKF1", flush=True)  # the store is back: the same feedback is applied, none lost
    assert r.status_code == 200 and len(r.json()["applied_groups"]) == 1
    assert _status(server)["active"] != before
    shutil.rmtree(store, ignore_errors=True)
