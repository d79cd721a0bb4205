"""The reconciler uses the store and the state machine, never anything web."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import reconcile


def test_the_reconciler_imports_nothing_web() -> None:
    modules = [info.name for info in pkgutil.walk_packages(reconcile.__path__, "reconcile.")
               if not info.name.endswith("__main__")]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "web = sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'"
        " or m.startswith(('gateway.api', 'gateway.webhooks', 'gateway.app')))\n"
        "print(','.join(web))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert len(modules) >= 3
    assert result.stdout.strip() == ""
