"""Run identity (issue 24): headers and body fields, validation, the bounded run registry, key bindings, per-run
drift and metrics, in process (TestClient, tiny Llama). The real-server test is tests/integration/test_runs.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.server.app import create_app
from rewardkit.server.drift import DriftMonitor
from rewardkit.server.errors import BadRequest, Forbidden
from rewardkit.server.runs import RunRegistry, RunTag, check_prefix, tag_from_headers
from rewardkit.server.settings import Settings
from tests.unit.server.test_monitoring import _settings as monitoring_settings
from tests.unit.server.test_monitoring import samples

KEY_A, KEY_ANY = "key-team-a-123456", "key-admin-123456"


@pytest.fixture(scope="module")
def rm(tiny_llama_dir: Path) -> RewardModel:
    return load_reward_model(tiny_llama_dir)


def _settings(model_dir: Path, **kw: object) -> Settings:
    return monitoring_settings(model_dir, **{"drift_window": 40, "max_runs": 3, **kw})


@pytest.fixture()
def client(tiny_llama_dir: Path, rm: RewardModel) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tiny_llama_dir), rm=rm)) as c:
        yield c


def test_headers_parse_and_bad_values_name_the_header() -> None:
    assert tag_from_headers([(b"x-rewardkit-run", b"exp-1/seed:0"), (b"x-rewardkit-step", b"42")]) == RunTag(
        "exp-1/seed:0", 42)
    assert tag_from_headers([]) is None
    for headers, field in [([(b"x-rewardkit-run", b"bad run")], "x-rewardkit-run"),
                           ([(b"x-rewardkit-run", b"a" * 65)], "x-rewardkit-run"),
                           ([(b"x-rewardkit-run", b"ok"), (b"x-rewardkit-step", b"-1")], "x-rewardkit-step"),
                           ([(b"x-rewardkit-run", b"ok"), (b"x-rewardkit-step", b"1.5")], "x-rewardkit-step"),
                           ([(b"x-rewardkit-step", b"3")], "x-rewardkit-step")]:
        with pytest.raises(BadRequest) as ei:
            tag_from_headers(headers)
        assert ei.value.field == field


def test_registry_is_bounded_and_folds_into_other() -> None:
    reg = RunRegistry(2, lambda: DriftMonitor(window=10, reference_size=5, min_samples=2))
    for run in ("a", "b", "c", "d"):
        reg.observe(RunTag(run, 7), [0.1, 0.2], [3, 4], None)
    names = {r.run_id: r for r in reg.runs()}
    assert set(names) == {"a", "b", "other"}
    assert names["other"].items == 4 and names["other"].last_step is None  # steps of mixed runs mean nothing
    assert names["a"].last_step == 7
    with pytest.raises(ValueError):
        RunRegistry(0, DriftMonitor)


def test_key_prefix_binding() -> None:
    check_prefix(RunTag("team-a/x"), "team-a/", "f")
    check_prefix(None, None, "f")
    for tag in (None, RunTag("team-b/x")):
        with pytest.raises(Forbidden):
            check_prefix(tag, "team-a/", "f")


def test_keys_file_binds_keys_to_run_prefixes(tmp_path: Path, tiny_llama_dir: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"{KEY_A} run=team-a/\n{KEY_ANY}\n")
    s = _settings(tiny_llama_dir, api_keys_file=f)
    assert s.key_run_prefix(KEY_A.encode()) == "team-a/" and s.key_run_prefix(KEY_ANY.encode()) is None
    f.write_text(f"{KEY_A} team=a\n")
    with pytest.raises(ValueError, match="line 1: unknown option"):
        _settings(tiny_llama_dir, api_keys_file=f)


def _score(client: TestClient, texts: list[str], headers: dict[str, str] | None = None, **body: object) -> int:
    r = client.post("/v1/rewards", json={"items": [{"text": t} for t in texts], **body}, headers=headers or {})
    return r.status_code


def test_runs_get_their_own_drift_metrics_and_listing(client: TestClient) -> None:
    short = [f"ok {i}" for i in range(25)]
    long = [f"a much longer answer that goes on and on about item number {i}" for i in range(25)]
    assert _score(client, short, {"x-rewardkit-run": "steady", "x-rewardkit-step": "1"}) == 200
    assert _score(client, short, {"x-rewardkit-run": "drifty"}, step=1) == 200
    assert _score(client, short, {"x-rewardkit-run": "steady", "x-rewardkit-step": "2"}) == 200
    assert _score(client, long, run_id="drifty", step=2) == 200  # body fields, no header
    assert _score(client, short) == 200  # no run: global monitor only
    d = {r: client.get("/v1/drift", params={"run": r}).json() for r in ("steady", "drifty")}
    assert d["steady"]["run"] == "steady" and d["steady"]["snapshot"]["n_current"] == 40
    assert d["steady"]["snapshot"]["psi"] < 0.15  # the same texts again (small samples: not exactly 0)
    assert d["drifty"]["snapshot"]["psi"] > 0.25  # its second half differs from its own start
    runs = {r["run"]: r for r in client.get("/v1/runs").json()["runs"]}
    assert runs["steady"]["last_step"] == 2 and runs["drifty"]["items"] == 50 and runs["drifty"]["last_step"] == 2
    m = samples(client.get("/metrics").text)
    psi = {dict(k[1])["run"]: v for k, v in m.items() if k[0] == "rewardkit_run_drift_psi"}
    assert psi["drifty"] > 0.25 > psi["steady"]
    step = {dict(k[1])["run"]: v for k, v in m.items() if k[0] == "rewardkit_run_step"}
    items = {dict(k[1])["run"]: v for k, v in m.items() if k[0] == "rewardkit_run_items"}
    assert step["steady"] == 2 and items["drifty"] == 50
    r = client.get("/v1/drift", params={"run": "nobody"})
    assert r.status_code == 404 and r.json()["error"]["field"] == "run"
    # the OpenRLHF endpoint takes the header too
    assert client.post("/get_reward", json={"query": ["x y"]}, headers={"x-rewardkit-run": "compat"}).status_code == 200
    assert "compat" in {r["run"] for r in client.get("/v1/runs").json()["runs"]}


def test_bad_run_values_are_4xx_naming_the_field(client: TestClient) -> None:
    r = client.post("/v1/rewards", json={"items": [{"text": "x"}]}, headers={"x-rewardkit-run": "no spaces"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "x-rewardkit-run"
    r = client.post("/v1/rewards", json={"items": [{"text": "x"}], "run_id": "bad id"})
    assert r.status_code == 422 and "run_id" in r.text
    r = client.post("/v1/rewards", json={"items": [{"text": "x"}], "step": 3})
    assert r.status_code == 422 and r.json()["error"]["field"] == "step"


def test_bound_key_may_only_score_its_runs(tmp_path: Path, tiny_llama_dir: Path, rm: RewardModel) -> None:
    f = tmp_path / "keys"
    f.write_text(f"{KEY_A} run=team-a/\n{KEY_ANY}\n")
    with TestClient(create_app(_settings(tiny_llama_dir, api_keys_file=f), rm=rm)) as c:
        a = {"Authorization": f"Bearer {KEY_A}"}
        assert _score(c, ["x"], {**a, "x-rewardkit-run": "team-a/exp1"}) == 200
        assert _score(c, ["x"], a, run_id="team-a/exp2") == 200
        for extra, body in (({"x-rewardkit-run": "team-b/exp1"}, {}), ({}, {}), ({}, {"run_id": "team-b/x"})):
            r = c.post("/v1/rewards", json={"items": [{"text": "x"}], **body}, headers={**a, **extra})
            assert r.status_code == 403 and r.json()["error"]["type"] == "forbidden", r.text
        assert c.get("/v1/drift", params={"run": "team-b/exp1"}, headers=a).status_code == 403
        assert _score(c, ["x"], {"Authorization": f"Bearer {KEY_ANY}", "x-rewardkit-run": "team-b/exp1"}) == 200
        listed = {r["run"] for r in c.get("/v1/runs", headers=a).json()["runs"]}
        assert listed == {"team-a/exp1", "team-a/exp2"}  # a bound key sees its own runs only
