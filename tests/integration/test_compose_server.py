"""Issue 24 part 3 over HTTP: one real server process serves two tiny reward models (``--model`` twice) and a
verifier; the client composes them in one request, and OpenRLHF's /get_reward returns the server's default
composition with its parts in ``extra_logs``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from rewardkit.client import RewardClient
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


def test_two_models_and_a_verifier_in_one_request(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    args = ("--model", f"gpt2={tiny_gpt2_dir}", "--max-length", "64",
            "--component", 'concise=length_penalty:{"limit": 8}',
            "--default-rewards", "llama=1,numeric_match=2")
    with ServerProcess(f"llama={tiny_llama_dir}", tmp_path, *args) as srv, RewardClient(srv.url) as rk:
        models = rk.models()
        assert [m.name for m in models] == ["llama", "gpt2"]
        assert {c.name for c in rk.components()} == {"concise", "exact_match", "numeric_match"}
        prompts, responses = ["7*8?", "7*8?", "7*8?"], ["\\boxed{56}", "about 54, I would say", "56"]
        weights = {"llama": 1.0, "gpt2": 0.5, "numeric_match": 2.0, "concise": 1.0}
        out = rk.compose(prompts=prompts, responses=responses, references=["56", "56", None], rewards=weights)
        solo = {m: rk.score(prompts=prompts, responses=responses, model=m) for m in ("llama", "gpt2")}
        for i, c in enumerate(out):
            assert c.components["llama"] == pytest.approx(solo["llama"][i], abs=1e-5)
            assert c.components["gpt2"] == pytest.approx(solo["gpt2"][i], abs=1e-5)
        assert out[0].components["numeric_match"] == 1.0 and out[1].components["numeric_match"] == 0.0
        for c in out[:2]:
            assert c.errors == {} and c.reward == pytest.approx(
                sum(w * c.components[n] for n, w in weights.items()), abs=1e-5)
        assert out[1].components["concise"] == pytest.approx(-1.0)
        # no reference for the third: its reward is null, the reason named, the models' parts still there
        assert out[2].reward is None and set(out[2].errors) == {"numeric_match"}
        assert out[2].components["llama"] == pytest.approx(solo["llama"][2], abs=1e-5)
        assert out[0].model == "composite" and "gpt2:" in (out[0].head_version or "")
        # OpenRLHF: the default composition, labels as references, each part in extra_logs
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        r = httpx.post(srv.url + "/get_reward", json={"query": texts, "prompts": prompts, "labels": ["56", "56", "56"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["extra_logs"]["numeric_match"] == [1.0, 0.0, 1.0]
        for i in range(3):
            assert body["rewards"][i] == pytest.approx(
                body["extra_logs"]["llama"][i] + 2.0 * body["extra_logs"]["numeric_match"][i], abs=1e-5)
        assert r.headers["x-rewardkit-model"] == "composite"
        # a bad composition is a 4xx naming the entry
        r = httpx.post(srv.url + "/v1/rewards", json={"items": [{"text": "a"}], "rewards": {"nosuch": 1}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "rewards.nosuch"


def test_a_second_model_needs_a_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "rewardkit.cli", "serve", "--model", str(tiny_llama_dir), "--model",
                        str(tiny_llama_dir)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "NAME=PATH" in p.stderr


def test_each_model_has_its_own_drift_and_runs(tiny_llama_dir: Path, tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """Drift, per-run drift, pin and the drift gauges are per served model: traffic to the second model shows in its
    own monitor (and its run), not in the first model's, and the first model's numbers are as before."""
    with ServerProcess(f"llama={tiny_llama_dir}", tmp_path, "--model", f"gpt2={tiny_gpt2_dir}", "--max-length",
                       "64") as srv:
        url = srv.url
        items = [{"prompt": f"q{i}?", "response": f"answer {i}"} for i in range(12)]
        r = httpx.post(url + "/v1/rewards", json={"items": items, "model": "gpt2"},
                       headers={"x-rewardkit-run": "team/run-b", "x-rewardkit-step": "3"})
        assert r.status_code == 200, r.text
        assert httpx.post(url + "/v1/rewards", json={"items": items[:5]}).status_code == 200  # the first model
        gpt2 = httpx.get(url + "/v1/drift", params={"model": "gpt2"}).json()
        first = httpx.get(url + "/v1/drift").json()
        assert gpt2["snapshot"]["n_current"] == 12 and first["snapshot"]["n_current"] == 5
        assert gpt2["model"] != first["model"]
        run_b = httpx.get(url + "/v1/drift", params={"model": "gpt2", "run": "team/run-b"})
        assert run_b.status_code == 200 and run_b.json()["snapshot"]["n_current"] == 12
        assert httpx.get(url + "/v1/drift", params={"run": "team/run-b"}).status_code == 404  # not the first's run
        runs = httpx.get(url + "/v1/runs", params={"model": "gpt2"}).json()["runs"]
        assert [(x["run"], x["last_step"]) for x in runs] == [("team/run-b", 3)]
        assert httpx.get(url + "/v1/runs").json()["runs"] == []
        pinned = httpx.post(url + "/v1/drift/reference/pin", params={"model": "gpt2"})
        assert pinned.status_code == 200 and pinned.json()["snapshot"]["reference_pinned"] is True
        assert httpx.get(url + "/v1/drift").json()["snapshot"]["reference_pinned"] is False
        bad = httpx.get(url + "/v1/drift", params={"model": "nosuch"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "model"
        text = httpx.get(url + "/metrics").text
        assert f'rewardkit_drift_samples{{model="{gpt2["model"]}",window="current"}} 12.0' in text
        assert f'rewardkit_drift_samples{{model="{first["model"]}",window="current"}} 5.0' in text
        assert f'rewardkit_run_items{{model="{gpt2["model"]}",run="team/run-b"}} 12.0' in text


@pytest.mark.redis
def test_second_model_uses_the_score_cache_and_fleet_drift(tiny_llama_dir: Path, tiny_gpt2_dir: Path,
                                                           redis_proc: Any, tmp_path: Path) -> None:
    """With Redis, the second model's scores are cached under its own id (a repeat is a hit and the same reward;
    the first model's reward for the same item is its own) and its drift window pools through Redis."""
    env = {"REWARDKIT_REDIS_URL": redis_proc.url, "REWARDKIT_REDIS_NAMESPACE": "it-compose",
           "REWARDKIT_DRIFT_SYNC_INTERVAL_S": "0.5"}
    with ServerProcess(f"llama={tiny_llama_dir}", tmp_path, "--model", f"gpt2={tiny_gpt2_dir}", "--max-length",
                       "64", env=env) as srv:
        def hits() -> float:
            line = [x for x in httpx.get(srv.url + "/metrics").text.splitlines()
                    if x.startswith("rewardkit_cache_hits_total ")]
            return float(line[0].split()[1])

        body = {"items": [{"prompt": "2+2?", "response": f"4, at {time.time()}"}]}
        first = httpx.post(srv.url + "/v1/rewards", json={**body, "model": "gpt2"}).json()["rewards"]
        before = hits()
        again = httpx.post(srv.url + "/v1/rewards", json={**body, "model": "gpt2"}).json()["rewards"]
        assert again == first and hits() == before + 1
        other = httpx.post(srv.url + "/v1/rewards", json=body).json()["rewards"]  # the first model: a miss
        assert hits() == before + 1 and other != first
        fleet = httpx.get(srv.url + "/v1/drift", params={"model": "gpt2", "scope": "fleet"})
        assert fleet.status_code == 200, fleet.text
        assert fleet.json()["snapshot"]["n_current"] == 2 and fleet.json()["replicas"] == 1
        assert httpx.get(srv.url + "/v1/drift", params={"scope": "fleet"}).json()["snapshot"]["n_current"] == 1
