"""compose.yaml: no container engine runs here, so the full stack is checked against the code."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.settings import Settings, parse_duration
from tests.deployment import (
    DEPLOY,
    PROJECT,
    ROOT,
    compose,
    dockerfile_port,
    image_name,
    known_settings,
    parse_command,
    secret_settings,
)
from tests.test_dockerfile import instructions

NGINX = (DEPLOY / "compose" / "nginx.conf").read_text()


def services() -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"]
    return found


def of_the_image() -> dict[str, Any]:
    """The services that run the project's image (built from the Dockerfile)."""
    (image,) = {s["image"] for s in services().values() if "build" in s}
    return {name: s for name, s in services().items() if s["image"] == image}


def replicas() -> dict[str, Any]:
    return {n: s for n, s in of_the_image().items() if parse_command(s["command"]).command
            == "serve"}


def nginx_directive(name: str) -> list[str]:
    # a directive's value ends at ';', a block ('server {') has none
    return re.findall(r"^[ \t]*" + name + r"[ \t]+([^;{\n]+);", NGINX, flags=re.MULTILINE)


def test_two_gateway_replicas_serve_with_a_command_the_code_accepts() -> None:
    assert len(replicas()) >= 2
    assert {image_name(s["image"]) for s in of_the_image().values()} == {PROJECT["name"]}
    assert {s["build"] for s in services().values() if "build" in s} == {"."}
    assert (ROOT / "Dockerfile").is_file()
    for name, service in replicas().items():
        args = parse_command(service["command"])
        assert args.host == "0.0.0.0", name
        assert args.port == dockerfile_port(), name
        assert not args.no_migrate, name
        assert service["read_only"] is True, name
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_the_stop_grace_period_outlasts_the_shutdown_deadline() -> None:
    for name, service in replicas().items():
        grace = parse_duration(service["stop_grace_period"])
        assert grace is not None
        assert grace > parse_command(service["command"]).shutdown_timeout, name


def test_every_setting_compose_gives_the_image_is_one_the_code_reads_and_accepts() -> None:
    for name, service in of_the_image().items():
        env = service["environment"]
        assert set(env) - known_settings() == set(), name
        settings = Settings.from_env({k: str(v) for k, v in env.items()})
        if name in replicas():
            settings.check_serving()  # raises SettingsError naming what is missing
            assert settings.database_url is not None
            assert secret_settings() & set(env)


def test_the_database_url_names_the_postgres_service_and_its_credentials() -> None:
    postgres = services()["postgres"]["environment"]
    for name, service in replicas().items():
        url = urlsplit(service["environment"]["DATABASE_URL"])
        assert url.hostname == "postgres", name
        assert (url.username, url.password) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"]
        ), name
        assert url.path == "/" + postgres["POSTGRES_DB"], name


def test_the_proxy_waits_for_replicas_the_images_healthcheck_reports_healthy() -> None:
    waits = services()["proxy"]["depends_on"]
    assert set(waits) == set(replicas())
    assert {w["condition"] for w in waits.values()} == {"service_healthy"}
    # compose.yaml gives the replicas no healthcheck of its own: the image's is the one
    assert all("healthcheck" not in s for s in replicas().values())
    (health,) = instructions("HEALTHCHECK")
    assert "/healthz" in health


def test_the_proxy_balances_over_every_replica_and_lets_the_gateway_answer_413() -> None:
    ports = {parse_command(s["command"]).port for s in replicas().values()}
    assert set(nginx_directive("server")) == {
        f"{name}:{port}" for name in replicas() for port in ports
    }
    (listen,) = nginx_directive("listen")
    assert services()["proxy"]["ports"] == [f"{listen}:{listen}"]
    (limit,) = nginx_directive("client_max_body_size")
    assert limit.endswith("m")
    defaults = Settings()
    assert int(limit[:-1]) * 1024 * 1024 > max(
        defaults.request_max_body_bytes, defaults.webhook_max_body_bytes
    )
    (read_timeout,) = nginx_directive("proxy_read_timeout")
    seconds = parse_duration(read_timeout)
    assert seconds is not None
    assert seconds > defaults.sse_heartbeat_seconds
    assert nginx_directive("proxy_buffering") == ["off"], "events must pass at once"


def test_the_backend_and_the_gateway_reach_each_other_with_one_webhook_secret() -> None:
    backend = services()["backend"]
    args = parse_command(backend["command"])
    assert args.command == "simulate-backend"
    (listen,) = nginx_directive("listen")
    assert args.webhook_base == f"http://proxy:{listen}"
    for name, service in replicas().items():
        url = urlsplit(service["environment"]["BACKEND_URL"])
        assert (url.hostname, url.port) == ("backend", args.port), name
        assert service["environment"]["WEBHOOK_SECRETS"] == backend["environment"][
            "WEBHOOK_SECRETS"
        ], name


def test_prometheus_scrapes_every_replica_with_the_alert_rules() -> None:
    mounts = dict(v.split(":")[:2] for v in services()["prometheus"]["volumes"]
                  if v.startswith("./"))
    config_source = next(s for s, target in mounts.items()
                         if target == "/etc/prometheus/prometheus.yml")
    config = yaml.safe_load((ROOT / config_source).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    ports = {parse_command(s["command"]).port for s in replicas().values()}
    assert targets == {f"{name}:{port}" for name in replicas() for port in ports}
    # rule files are relative to the config file, in the container as on disk
    for rule_file in config["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts.values()
        assert ((ROOT / config_source).parent / rule_file).is_file()


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    mounts = dict(v.split(":")[:2] for v in services()["grafana"]["volumes"])
    by_target = {target: ROOT / source for source, target in mounts.items()}
    datasources = next(
        yaml.safe_load(p.read_text()) for t, p in by_target.items() if "/datasources/" in t
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert urlsplit(source["url"]).hostname == "prometheus"
    providers = next(
        yaml.safe_load(p.read_text()) for t, p in by_target.items() if "/dashboards/" in t
        and p.is_file()
    )
    (provider,) = providers["providers"]
    dashboards = by_target[provider["options"]["path"]]
    assert (dashboards / "sorami-gateway.json").is_file()


@pytest.mark.parametrize("service", ["proxy", "prometheus", "grafana"])
def test_every_file_compose_mounts_exists(service: str) -> None:
    for volume in services()[service]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), volume
