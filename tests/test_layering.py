"""The layers import downwards only: the domain nothing of the store, web or delivery; the use
cases and the reconciler nothing web. And no module grows into several."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import gateway
import gateway.jobs
import gateway.usecases
import reconcile

WEB = ("aiohttp", "gateway.api", "gateway.webhooks", "gateway.app", "gateway.server",
       "gateway.middleware", "gateway.events")
STORE = ("asyncpg", "gateway.store", "gateway.database")
DELIVERY = ("gateway.delivery",)


def imported_by(package: ModuleType, prefixes: tuple[str, ...]) -> tuple[list[str], str]:
    """The package's modules, and those of `prefixes` that importing them loads (in a fresh
    interpreter, so nothing imported by the tests themselves counts)."""
    modules = [info.name for info in pkgutil.walk_packages(package.__path__,
                                                           package.__name__ + ".")
               if not info.name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"prefixes = {prefixes!r}\n"
        "found = sorted(m for m in sys.modules"
        " if any(m == p or m.startswith(p + '.') for p in prefixes))\n"
        "print(','.join(found))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return modules, result.stdout.strip()


def test_the_reconciler_imports_nothing_web() -> None:
    modules, found = imported_by(reconcile, WEB)
    assert len(modules) >= 3
    assert found == ""


def test_the_domain_imports_nothing_of_the_store_web_or_delivery() -> None:
    modules, found = imported_by(gateway.jobs, STORE + WEB + DELIVERY)
    assert len(modules) >= 6
    assert found == ""


def test_the_import_check_sees_what_a_package_loads() -> None:
    _, found = imported_by(reconcile, STORE)
    assert "gateway.store" in found.split(",")


def test_the_use_cases_import_nothing_web() -> None:
    modules, found = imported_by(gateway.usecases, WEB)
    assert len(modules) >= 5
    assert found == ""


# A module past this many lines holds several things a reader would look for separately.
MAX_MODULE_LINES = 500


def test_no_module_of_the_gateway_or_the_reconciler_is_over_500_lines() -> None:
    roots = [Path(gateway.__file__).parent, Path(reconcile.__file__).parent]
    sizes = {str(p): len(p.read_text().splitlines()) for root in roots
             for p in root.rglob("*.py")}
    assert len(sizes) > 50
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
