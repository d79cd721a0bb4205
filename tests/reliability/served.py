"""A served gateway for hostile-input scenarios, a raw HTTP/1.1 client that sends any bytes,
the database's content summed up per table, and a process's memory from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from tests.conftest import HS256_SECRET, WEBHOOK_SECRET
from tests.procs import Proc, clean_env, free_port, start, wait_ready


@dataclasses.dataclass
class Served:
    port: int
    proc: Proc

    @property
    def pid(self) -> int:
        return self.proc.popen.pid

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def served(database_url: str, **env: str | None) -> AsyncIterator[Served]:
    """`python -m gateway serve` on a free port, ready; stopped (and checked) on exit.
    `env` adds settings or, with None, leaves out one of the defaults."""
    port = free_port()
    settings: dict[str, str | None] = {
        "DATABASE_URL": database_url, "WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "AUTH_HS256_SECRET": HS256_SECRET, "PORT": str(port), "LOG_LEVEL": "warning"}
    settings.update(env)
    proc = start(["serve", "--no-migrate"],
                 clean_env(**{k: v for k, v in settings.items() if v is not None}))
    try:
        await wait_ready(port, timeout=30)
        yield Served(port, proc)
    finally:
        code, err = proc.stop()
    assert code == 0, err[-3000:]


@dataclasses.dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(port: int, head: bytes, body: bytes = b"",
                      timeout: float = 30.0) -> RawResponse:
    """Send `head` (request line and headers, without the blank line) and `body` exactly as
    given, on a connection of its own that the server is asked to close."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("closed without an answer")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


def webhook_head(route: str, headers: dict[str, bytes | str], length: int) -> bytes:
    lines = [f"POST {route} HTTP/1.1".encode(), b"Host: 127.0.0.1",
             f"Content-Length: {length}".encode()]
    for name, value in headers.items():
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(name.encode() + b": " + raw)
    return b"\r\n".join(lines)


async def table_digest(dsn: str) -> dict[str, tuple[int, str]]:
    """Every public table's row count and a checksum of its rows."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        digest = {}
        for table in tables:
            row = await conn.fetchrow(
                f'SELECT count(*) AS n, md5(coalesce(string_agg(t::text, chr(10)'
                f' ORDER BY t::text), \'\')) AS sum FROM "{table}" t')
            digest[table] = (row["n"], row["sum"])
        return digest
    finally:
        await conn.close()


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]
