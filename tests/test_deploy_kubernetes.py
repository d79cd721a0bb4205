"""deploy/kubernetes: the kustomization renders, and what it runs matches the code."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from gateway.health import routes as health_routes
from gateway.metrics.exposition import routes as metrics_routes
from gateway.settings import Settings
from reconcile.runner import RunOptions
from tests.deployment import (
    DEPLOY,
    PROJECT,
    dockerfile_port,
    dockerfile_user_id,
    image_name,
    known_settings,
    parse_command,
    pod_specs,
    render,
    secret_settings,
    the,
)

OVERLAY = "overlays/example"
# every kustomization an operator may build: the base alone and the example overlay
BUILDS = ["base", OVERLAY]
# PostgreSQL's default max_connections (100) less superuser_reserved_connections (3)
POSTGRES_CONNECTIONS = 97

SERVED_PATHS = {route.path for route in [*health_routes, *metrics_routes]}


def containers(objects: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [c for spec in pod_specs(objects).values() for c in spec["containers"]]


def server(objects: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (container,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def prestop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


def config_data(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return {k: v for o in objects if o["kind"] == "ConfigMap" for k, v in o["data"].items()}


def setting_names(objects: tuple[dict[str, Any], ...]) -> set[str]:
    """Every variable name the rendered objects give a process: env, ConfigMaps, Secrets."""
    names: set[str] = set()
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret"):
            names |= set(obj.get("data", {})) | set(obj.get("stringData", {}))
    for container in containers(objects):
        for entry in container.get("env", []):
            names.add(entry["name"])
            ref = entry.get("valueFrom", {})
            for kind in ("secretKeyRef", "configMapKeyRef"):
                if kind in ref:
                    names.add(ref[kind]["key"])
    return names


@pytest.mark.parametrize("build", BUILDS)
def test_the_grace_period_outlasts_the_prestop_pause_and_the_shutdown_deadline(
    build: str,
) -> None:
    objects = render(build)
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    container = server(objects)
    args = parse_command(container["command"] + container.get("args", []))
    assert args.command == "serve"
    # Kubernetes counts the preStop pause inside the grace period, then sends SIGTERM
    needed = prestop_seconds(container) + args.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] > needed
    assert prestop_seconds(container) >= 5, "too short for the endpoints to drop the pod"


@pytest.mark.parametrize("build", BUILDS)
def test_every_setting_named_in_the_manifests_is_one_the_code_reads(build: str) -> None:
    names = setting_names(render(build))
    assert names, "no settings found: the check would prove nothing"
    assert names - known_settings() == set()


def test_every_setting_in_the_env_files_of_deploy_is_one_the_code_reads() -> None:
    files = [*DEPLOY.rglob("*.env"), *DEPLOY.rglob("*.env.example")]
    assert files
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                name = line.split("=", 1)[0].strip()
                assert name in known_settings(), f"{path.relative_to(DEPLOY)}: {name}"


@pytest.mark.parametrize("build", BUILDS)
def test_every_secret_setting_comes_from_a_secret(build: str) -> None:
    objects = render(build)
    secret_names = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert not secret_settings() & set(config_data(objects)), "a secret in a ConfigMap"
    for container in containers(objects):
        for entry in container.get("env", []):
            if entry["name"] in secret_settings():
                assert "value" not in entry, f"{entry['name']} is inline"
                ref = entry["valueFrom"]["secretKeyRef"]
                assert ref["key"] == entry["name"]
                if secret_names:
                    assert ref["name"] in secret_names
        for source in container.get("envFrom", []):
            if "secretRef" in source and secret_names:
                assert source["secretRef"]["name"] in secret_names
    if build == OVERLAY:
        (secret,) = [o for o in objects if o["kind"] == "Secret"]
        # what `serve` requires of a deployment with a database (Settings.check_serving)
        assert {"DATABASE_URL", "WEBHOOK_SECRETS"} <= set(secret["data"])
        assert set(secret["data"]) <= secret_settings()


def test_the_server_and_the_reconciler_read_the_database_from_one_secret() -> None:
    objects = render(OVERLAY)
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    for name, spec in pod_specs(objects).items():
        (container,) = spec["containers"]
        sources = {
            ref["name"]
            for e in container.get("envFrom", [])
            for ref in (e.get("secretRef"), e.get("configMapRef"))
            if ref
        }
        sources |= {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if e["name"] == "DATABASE_URL"
        }
        assert secret["metadata"]["name"] in sources, name
        assert configmap["metadata"]["name"] in sources, name


@pytest.mark.parametrize("build", BUILDS)
def test_the_server_and_the_reconciler_run_one_image_with_commands_the_code_accepts(
    build: str,
) -> None:
    objects = render(build)
    specs = pod_specs(objects)
    assert set(specs) == {"sorami-gateway", "sorami-reconcile"}
    images = {c["image"] for c in containers(objects)}
    assert len(images) == 1, images
    (image,) = images
    assert image_name(image) == PROJECT["name"]
    serve = parse_command(server(objects)["command"])
    assert serve.command == "serve"
    assert serve.host == "0.0.0.0"
    assert not serve.no_migrate, "the server applies migrations under the advisory lock"
    assert serve.workers == 1, "one process per pod: replicas are the unit of scale"
    (port,) = server(objects)["ports"]
    assert port["containerPort"] == serve.port == dockerfile_port()
    (reconcile,) = specs["sorami-reconcile"]["containers"]
    run = parse_command(reconcile["command"])
    assert run.command == "run"
    assert not run.dry_run


@pytest.mark.parametrize("build", BUILDS)
def test_the_probes_ask_routes_the_server_serves_on_its_port(build: str) -> None:
    container = server(render(build))
    port_names = {p["name"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # a migration runs before the server listens: the startup probe waits for it
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in SERVED_PATHS
        assert get["port"] in port_names


@pytest.mark.parametrize("build", BUILDS)
def test_the_pods_run_as_the_images_user_non_root_on_a_read_only_filesystem(
    build: str,
) -> None:
    for name, spec in pod_specs(render(build)).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == dockerfile_user_id(), name
        assert spec["automountServiceAccountToken"] is False, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name


@pytest.mark.parametrize("build", BUILDS)
def test_the_service_budget_and_autoscaler_all_point_at_the_server_pods(build: str) -> None:
    objects = render(build)
    deployment = the(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = the(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in server(objects)["ports"]}
    budget = the(objects, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    autoscaler = the(objects, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] >= 2
    # the autoscaler owns the count; a fixed one would reset it on every apply
    assert "replicas" not in deployment["spec"]
    assert budget["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in server(objects)["resources"]["requests"], "utilization needs a request"


def test_the_servicemonitor_scrapes_metrics_on_each_server_pod() -> None:
    objects = render(OVERLAY)
    monitor = the(objects, "ServiceMonitor")
    service = the(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert "/metrics" in SERVED_PATHS


def test_the_autoscalers_ceiling_keeps_connections_under_postgresqls_limit() -> None:
    objects = render(OVERLAY)
    settings = Settings.from_env(config_data(objects))
    autoscaler = the(objects, "HorizontalPodAutoscaler")
    (concurrency,) = [f.default for f in dataclasses.fields(RunOptions)
                      if f.name == "concurrency"]
    assert isinstance(concurrency, int)
    # sorami-reconcile run opens concurrency + 2 connections
    needed = autoscaler["spec"]["maxReplicas"] * settings.db_pool_max + concurrency + 2
    assert needed <= POSTGRES_CONNECTIONS


@pytest.mark.parametrize("build", BUILDS)
def test_the_configmap_holds_settings_the_code_accepts(build: str) -> None:
    data = config_data(render(build))
    assert data
    Settings.from_env(data)  # raises SettingsError naming a malformed one
