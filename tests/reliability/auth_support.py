"""What the authentication and authorization scenarios share: a gateway process started as an
operator starts it, a real JWKS server that counts its fetches and can be taken down, the
client routes as `/openapi.json` lists them, and a snapshot of every table to prove that
refused requests changed nothing."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from gateway.store import Database
from tests.procs import Proc, free_port
from tests.reliability.served import served
from tests.tokens import KeyPair, jwks


@dataclasses.dataclass
class Gateway:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logged(self, event: str) -> int:
        """How many log lines carry this event name."""
        return self.proc.stderr.count(f'"event": "{event}"')


@contextlib.asynccontextmanager
async def serve_gateway(database_url: str, **env: str) -> AsyncIterator[Gateway]:
    """`python -m gateway serve` on a free port against this (migrated) database, logging at
    info, with only the authentication `env` names."""
    settings: dict[str, str | None] = {"AUTH_HS256_SECRET": None, "LOG_LEVEL": "info", **env}
    async with served(database_url, **settings) as server:
        gateway = Gateway(server.proc, server.port)
        yield gateway
    # reached only when the scenario itself passed, so its own failure is the one reported;
    # an unexpected exception in a handler is logged at error level (and answered 500)
    assert '"level": "error"' not in gateway.proc.stderr, gateway.proc.stderr[-3000:]


class JWKSServer:
    """The identity provider's key set on a real aiohttp server: counts every fetch, and can
    be stopped (an outage: connections refused) and started again on the same port."""

    def __init__(self, *pairs: KeyPair, path: str = "/.well-known/jwks.json") -> None:
        self.document: dict[str, Any] = jwks(*pairs)
        self.fetched_at: list[float] = []  # time.monotonic() of each request received
        self.port = free_port()
        self.path = path
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def fetches(self) -> int:
        return len(self.fetched_at)

    async def _handle(self, request: web.Request) -> web.Response:
        self.fetched_at.append(time.monotonic())
        return web.json_response(self.document)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def jwks_server(*pairs: KeyPair) -> AsyncIterator[JWKSServer]:
    server = JWKSServer(*pairs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def openapi_document(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/openapi.json") as resp:
        assert resp.status == 200
        document: dict[str, Any] = await resp.json()
        return document


def bearer_operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(METHOD, path template) of every operation that takes a bearer token."""
    found = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if {"bearer": []} in operation.get("security", []):
                found.append((method.upper(), path))
    return sorted(found)


async def table_names(db: Database) -> list[str]:
    rows = await db.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")
    return [r["tablename"] for r in rows]


async def snapshot(db: Database) -> dict[str, list[str]]:
    """Every row of every table, as text, in a stable order: equal snapshots mean nothing
    was written (not even a timestamp)."""
    result = {}
    for name in await table_names(db):
        rows = await db.fetch(f'SELECT t::text AS row FROM "{name}" t ORDER BY t::text')
        result[name] = [r["row"] for r in rows]
    return result


async def row_count(db: Database) -> int:
    return sum(len(rows) for rows in (await snapshot(db)).values())
