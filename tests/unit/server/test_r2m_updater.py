"""R2M updater and head store without HTTP: grouping, whole-group-or-nothing, atomic versions, rollback, replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rewardkit.core.r2m import R2MConfig, R2MHead
from rewardkit.server.r2m.feedback import Entry, FeedbackSample, MemoryFeedbackQueue
from rewardkit.server.r2m.store import HeadStore, version_name
from rewardkit.server.r2m.updater import R2MUpdater

D_RM, D_P = 8, 6


def _store(tmp: Path) -> HeadStore:
    store = HeadStore(tmp, "tiny/model")
    torch.manual_seed(0)
    score = torch.nn.Linear(D_RM, 1, bias=False)
    cfg = R2MConfig(d_rm=D_RM, d_policy=D_P, d_attn=4, total_rounds=10, lr=1e-2)
    store.save(R2MHead.from_scalar_head(score, cfg), 0, round=0, applied=[], parent=None)
    return store


def _sample(g: str, i: int, rnd: int = 5, k: int = 4, s: int = 3, bad: bool = False) -> FeedbackSample:
    rng = np.random.default_rng(hash((g, i)) % 2**32)
    h = rng.normal(size=(s, D_P)).astype(np.float32)
    if bad:
        h[0, 0] = np.inf  # the wire refuses this; here it stands for a poisoned update
    return FeedbackSample(g, i, rnd, k, rng.normal(size=D_RM).astype(np.float32), h)


class RecordingQueue(MemoryFeedbackQueue):
    def __init__(self) -> None:
        super().__init__()
        self.acked: list[str] = []

    def ack(self, ids):  # type: ignore[no-untyped-def]
        self.acked.extend(ids)


def _entries(samples: list[FeedbackSample], start: int = 0) -> list[Entry]:
    return [Entry(str(start + i), sample=s) for i, s in enumerate(samples)]


def test_group_applies_only_when_complete_and_creates_a_version(tmp_path: Path) -> None:
    q = RecordingQueue()
    up = R2MUpdater(_store(tmp_path), q)
    before = {k: v.clone() for k, v in up.active.head.state_dict().items()}
    assert up.process(_entries([_sample("a", 0), _sample("a", 1), _sample("a", 2)])) == []
    assert up.active.version == "r2m-000000" and up.pending_groups() == 1 and q.acked == []
    assert up.process(_entries([_sample("a", 3)], start=3)) == ["5:a"]
    assert up.active.version == "r2m-000001" and up.pending_groups() == 0
    assert sorted(q.acked) == ["0", "1", "2", "3"]  # acknowledged only after the update
    after = up.active.head.state_dict()
    assert not torch.equal(before["phi.weight"], after["phi.weight"])
    info = up.store.info(1)
    assert info.applied == ("5:a",) and info.parent == "r2m-000000" and info.round == 5


def test_duplicates_and_replays_are_not_applied_twice(tmp_path: Path) -> None:
    q = RecordingQueue()
    store = _store(tmp_path)
    up = R2MUpdater(store, q)
    grp = [_sample("a", i, k=2) for i in range(2)]
    up.process(_entries([grp[0], grp[0]]))  # same index twice: one counts
    assert up.duplicates == 1 and up.pending_frames() == 1
    up.process(_entries([grp[1]], start=2))
    assert up.active.number == 1
    # a restart re-delivers the same entries (crash between write and ack): acknowledged, not applied
    up2 = R2MUpdater(store, RecordingQueue())
    assert up2.process(_entries(grp, start=10)) == []
    assert up2.active.number == 1 and store.numbers() == [0, 1] and up2.duplicates == 2
    assert sorted(up2.queue.acked) == ["10", "11"]  # type: ignore[attr-defined]


def test_update_is_whole_group_or_nothing(tmp_path: Path) -> None:
    q = RecordingQueue()
    up = R2MUpdater(_store(tmp_path), q)
    before = {k: v.clone() for k, v in up.active.head.state_dict().items()}
    # two groups complete together; one carries a non-finite value -> loss non-finite -> neither applies
    samples = [_sample("a", 0, k=2), _sample("a", 1, k=2), _sample("b", 0, k=2), _sample("b", 1, k=2, bad=True)]
    assert up.process(_entries(samples)) == []
    assert up.active.number == 0 and up.store.numbers() == [0] and up.groups_rejected == 2
    for k, v in up.active.head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert up.last_error and "not applied" in up.last_error


def test_flush_completes_small_groups_and_rejects_single_member(tmp_path: Path) -> None:
    up = R2MUpdater(_store(tmp_path), RecordingQueue())
    up.process(_entries([_sample("a", 0), _sample("a", 1), _sample("b", 0)]))
    applied = up.process([Entry("9", flush_keys=["5:a", "5:b"], flush_id="f1")])
    assert applied == ["5:a"]
    res = up.flush_result("f1")
    assert res is not None and res["rejected"] == [{"group": "5:b", "size": 1}] and res["version"] == "r2m-000001"
    assert up.pending_groups() == 0 and up.groups_rejected == 1


def test_rollback_and_restart_keep_the_activated_version(tmp_path: Path) -> None:
    store = _store(tmp_path)
    up = R2MUpdater(store, RecordingQueue())
    for n, g in enumerate(["a", "b"]):
        up.process(_entries([_sample(g, 0, k=2), _sample(g, 1, k=2)], start=10 * n))
    assert up.active.number == 2
    v1 = {k: v.clone() for k, v in store.load(1)[0].state_dict().items()}
    snapshot = up.active  # a request in flight holds this snapshot
    up.activate("r2m-000001")
    assert up.active.number == 1 and snapshot.number == 2  # the old snapshot is untouched
    for k, v in up.active.head.state_dict().items():
        assert torch.equal(v, v1[k])
    with pytest.raises(KeyError):
        up.activate("r2m-000099")
    assert R2MUpdater(store, RecordingQueue()).active.number == 1  # the rollback survives a restart
    up.process(_entries([_sample("c", 0, k=2), _sample("c", 1, k=2)], start=50))
    assert up.active.number == 3 and store.info(3).parent == "r2m-000001"
    assert R2MUpdater(store, RecordingQueue()).active.number == 3  # a newer version supersedes the rollback


def test_store_writes_are_atomic_and_refuse_overwrite(tmp_path: Path) -> None:
    store = _store(tmp_path)
    head, _ = store.load(0)
    with pytest.raises(FileExistsError):
        store.save(head, 0, round=0, applied=[], parent=None)
    assert [p.name for p in store.dir.iterdir() if p.name.startswith(".")] == []  # no temp files left
    data = store.path(0).read_bytes()
    assert store.write_bytes(0, data) is False
    with pytest.raises(Exception, match="version"):
        store.write_bytes(5, data)  # a file claiming version 0 cannot become version 5
    assert store.numbers() == [0] and version_name(5) == "r2m-000005"


def test_updater_thread_applies_from_the_queue(tmp_path: Path) -> None:
    import asyncio
    import time

    q = MemoryFeedbackQueue()
    up = R2MUpdater(_store(tmp_path), q)
    up.start()
    try:
        asyncio.run(q.put([_sample("a", i, k=3) for i in range(3)]))
        deadline = time.monotonic() + 10
        while up.active.number == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert up.active.number == 1 and up.running
    finally:
        up.stop()
    assert not up.running


def test_store_keeps_a_bounded_number_of_versions_by_default(tmp_path: Path) -> None:
    """Issue 16 #14: every update wrote a head file and none was deleted, so a client could grow the disk."""
    from rewardkit.server.settings import Settings

    keep = Settings().r2m_keep_versions
    assert keep > 0
    store = HeadStore(tmp_path, "tiny/model", keep=keep)
    head, _ = _store(tmp_path / "seed").load(0)
    store.save(head, 0, round=0, applied=[], parent=None)
    for n in range(1, keep + 11):
        store.save(head, n, round=n, applied=[], parent=version_name(n - 1))
    nums = store.numbers()
    assert 0 in nums and nums[-1] == keep + 10  # the initial head stays, the newest is there
    assert len(nums) <= keep + 2
