"""The Grafana dashboard and its provisioning (docker/grafana): the panels exist, they query the provisioned
Prometheus, and every metric they name is one the code actually exports."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from synth_service.metrics import SynthMetrics
from trainer.metrics import TrainerMetrics

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dfkd.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "dfkd.yml"

PANELS = ["generation rate", "loss terms", "backlog", "seconds starved", "eval top-1", "http latency"]
# Names in PromQL that start with the project's prefix; labels and functions never do.
METRIC_NAME = re.compile(r"\bdfkd_[a-zA-Z0-9_]+")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}


def _sample_names(family: Metric) -> set[str]:
    """What Prometheus stores for one family: its name plus the suffixed series the exposition adds."""
    return {family.name, *(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    names: set[str] = set()
    for metrics in (SynthMetrics(), TrainerMetrics(port=None)):
        for family in metrics.registry.collect():
            names |= _sample_names(family)
            names |= {sample.name for sample in family.samples}  # those with samples already (unlabelled ones)
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(panel, target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_exported_names_come_from_the_code(exported):
    # The reference set is real: both prefixes, counters with _total, histograms with _bucket.
    assert "dfkd_synth_images_generated_total" in exported
    assert "dfkd_synth_http_request_duration_seconds_bucket" in exported
    assert "dfkd_trainer_starved_seconds_total" in exported
    assert "dfkd_trainer_eval_top1" in exported
    # ... and does not accept just anything with the prefix.
    assert "dfkd_synth_nonexistent_total" not in exported
    assert "dfkd_trainer_eval_top1_total" not in exported  # a gauge has no _total


def test_panels_exist(dashboard):
    titles = [panel["title"].lower() for panel in dashboard["panels"]]
    for wanted in PANELS:
        assert sum(wanted in title for title in titles) == 1, (wanted, titles)
    assert all(panel["type"] == "timeseries" for panel in dashboard["panels"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_target_queries_the_provisioned_datasource(dashboard):
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    # The URL comes from the compose file: the service name, or 127.0.0.1 on the host network (compose.cpu.yml).
    assert datasource["type"] == "prometheus" and datasource["url"] == "${DFKD_PROMETHEUS_URL}"
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
    for panel, target in _targets(dashboard):
        assert target.get("expr", "").strip(), (panel["title"], target)
        assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_every_metric_on_the_dashboard_is_exported(dashboard, exported):
    used = {name for _, target in _targets(dashboard) for name in METRIC_NAME.findall(target["expr"])}
    assert len(used) >= 8, used  # the panels are not silently empty of metrics
    missing = used - exported
    assert not missing, f"the dashboard queries metrics no code exports: {sorted(missing)}"


def test_the_metric_check_catches_a_misspelt_name(dashboard, exported):
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][0]["targets"][0]["expr"] = "sum(rate(dfkd_synth_nonexistent_total[1m]))"
    used = {name for _, target in _targets(broken) for name in METRIC_NAME.findall(target["expr"])}
    assert used - exported == {"dfkd_synth_nonexistent_total"}


def test_queries_are_valid_promql(dashboard, tmp_path):
    """promtool parses each query as a recording rule: syntax errors would otherwise show only in the browser."""
    promtool = shutil.which("promtool", path=f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    if promtool is None:
        pytest.skip("no promtool (`./dev test` installs it into .venv/bin)")
    rules = [{"record": f"dfkd:dashboard_check_{i}", "expr": target["expr"]}
             for i, (_, target) in enumerate(_targets(dashboard))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # ... and it does reject a broken one.
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [
        {"record": "dfkd:bad", "expr": "sum(rate(dfkd_synth_batches_total[1m])"}]}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


def test_provisioning_points_at_the_mounted_dashboards():
    [provider] = yaml.safe_load(PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    # The compose file mounts docker/grafana/dashboards there, and the provisioning folder where Grafana reads it.
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./docker/grafana/dashboards:{path}:ro" in mounts
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert (REPO / "docker" / "grafana" / "dashboards" / DASHBOARD.name).is_file()
    home = compose["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home in (None, f"{path}/{DASHBOARD.name}")
