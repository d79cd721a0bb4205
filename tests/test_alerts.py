"""deploy/: the alert rules fire when they must and only then, and use metrics we export."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.metrics_helpers import Scrape, needs_promtool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "sorami-gateway.json"
METRIC_NAME = re.compile(r"\bsorami_[a-z0-9_]+")
# every alert the operators asked for, by what it watches
REQUIRED_ALERTS = {
    "SoramiOrphansOld", "SoramiOrphansGrowing", "SoramiReconcileStale", "SoramiOutboxBacklog",
    "SoramiWebhookSignatureFailures", "SoramiHttp5xxRate", "SoramiJobsStuck",
    "SoramiWorkerRestarts",
}


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_fire_and_stay_quiet_as_their_unit_tests_say() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_scrape_config_passes_promtool_check_config() -> None:
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses expressions of recording rules; Grafana's $__rate_interval is a range
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{n}", "expr": expr.replace("$__rate_interval", "5m")}
        for n, expr in enumerate(dashboard_exprs())
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_required_alert_exists() -> None:
    assert {rule["alert"] for rule in alert_rules()} >= REQUIRED_ALERTS


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a quiet case"


def test_every_alert_says_what_happened_and_how_bad() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]


def test_dashboard_is_grafana_json_with_a_panel_for_every_alert() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "sorami-gateway"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    shown = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    for rule in alert_rules():
        watched = set(METRIC_NAME.findall(rule["expr"]))
        assert watched <= shown, f"{rule['alert']}: no panel shows {watched - shown}"


async def test_rules_and_dashboard_use_only_metrics_the_gateway_exports(
    aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
    exported = Scrape(await (await client.get("/metrics")).text()).sample_names()
    used = {
        name
        for expr in [*dashboard_exprs(), *(rule["expr"] for rule in alert_rules())]
        for name in METRIC_NAME.findall(expr)
    }
    assert used, "no sorami_ metric found in the rules and dashboard"
    assert used - exported == set()


@pytest.mark.parametrize("path", ["prometheus/prometheus.yml", "prometheus/alerts.yml",
                                  "prometheus/alerts_test.yml"])
def test_deploy_yaml_files_load(path: str) -> None:
    assert yaml.safe_load((DEPLOY / path).read_text())
