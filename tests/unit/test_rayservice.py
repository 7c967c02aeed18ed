"""deploy/rayservice.yaml, checked offline (no cluster here): its serve config against Ray Serve's own schema, its
import path and args through the real builder, env names against Settings, GPUs against the scale args."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'rewardkit[ray]')")

import ray  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from rewardkit.server.ray_serve import proxy  # noqa: E402
from rewardkit.server.ray_serve.deployment import SCALE_FIELDS, Scale  # noqa: E402
from rewardkit.server.settings import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert len(docs) == 1
    return docs[0]  # type: ignore[no-any-return]


def _groups(rs: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rs["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]


def test_kind_and_ray_version(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__  # the version the extra pins


def test_serve_config_is_valid_for_ray_serve_and_builds_the_application(rayservice: dict[str, Any]) -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    assert config.http_options.port == 8000
    (app,) = config.applications
    module, _, attr = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = builder(dict(app.args))  # the real builder: unknown args or bad settings raise here
    assert type(built).__name__ == "Application"
    scale = Scale.from_args(app.args)
    assert scale.replicas is None and scale.max_replicas >= scale.min_replicas >= 1  # autoscaled
    Settings(**{k: v for k, v in app.args.items() if k not in SCALE_FIELDS})


def test_env_names_are_settings_fields_and_the_proxy_hook_is_on_every_node(rayservice: dict[str, Any]) -> None:
    for group in _groups(rayservice):
        (container,) = group["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[proxy.ENV] == proxy.CALLBACK  # a proxy runs on every node (proxy_location: EveryNode)
        for name in env:
            if name.startswith("REWARDKIT_"):
                assert name.removeprefix("REWARDKIT_").lower() in Settings.model_fields, name


def test_gpu_workers_match_the_scale(rayservice: dict[str, Any]) -> None:
    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    head, *workers = _groups(rayservice)
    assert head["rayStartParams"]["num-cpus"] == "0"  # no model on the head
    (gpu,) = workers
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert float(limits["nvidia.com/gpu"]) >= float(args["num_gpus"])
    assert gpu["maxReplicas"] * float(limits["nvidia.com/gpu"]) >= args["max_replicas"] * float(args["num_gpus"])
    mounts = {m["mountPath"] for m in gpu["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert str(Path(args["model"]).parent) in mounts  # the model path exists where the replicas run
