"""Concurrent deliveries: one effect each, one job at a time, and no 2xx without a commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import structlog

from gateway.app import create_app
from gateway.settings import Secret, Settings
from gateway.store import Database
from gateway.store.dsn import DatabaseURL
from tests.conftest import WEBHOOK_KEY
from tests.factories import insert_job
from tests.signing import signed

IMAGE_ROUTE = "/api/webhooks/image-completion"


def completed(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "status": "completed", "user_id": "user_a",
            "original_prompt": f"prompt of {job_id}",
            "data": {"images": [{"url": f"https://cdn/{job_id}/1.png", "format": "PNG",
                                 "dimensions": "1024x1024", "file_path": f"{job_id}/1.png"}]}}


async def test_200_concurrent_deliveries_of_50_webhooks_make_exactly_50_effects(
    aiohttp_server: Callable[..., Any], make_settings: Callable[..., Settings], db: Database
) -> None:
    server = await aiohttp_server(create_app(make_settings(db_pool_min=2, db_pool_max=10)))
    known = [await insert_job(db, job_id=f"job-{i:02d}") for i in range(40)]
    unknown = [f"backend-{i:02d}" for i in range(10)]
    deliveries = [signed(completed(job_id), WEBHOOK_KEY, f"msg-{job_id}")
                  for job_id in known + unknown]
    # each webhook four times, interleaved so that copies race each other
    requests = [d for _ in range(4) for d in deliveries]

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=200)
    ) as session:
        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, str]:
            async with session.post(server.make_url(IMAGE_ROUTE), data=body,
                                    headers=headers) as resp:
                return resp.status, (await resp.json())["outcome"]

        started = time.perf_counter()
        answers = await asyncio.gather(*(post(*r) for r in requests))
        elapsed = time.perf_counter() - started

    assert Counter(answers) == {(200, "applied"): 40, (202, "orphaned"): 10,
                                (200, "duplicate"): 150}
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 50
    assert await db.fetchval("SELECT count(*) FROM job_events") == 40
    assert await db.fetchval("SELECT count(*) FROM job_files") == 40
    assert await db.fetchval("SELECT count(*) FROM notifications") == 40
    assert await db.fetchval(
        "SELECT count(*) FROM jobs WHERE status = 'COMPLETED' AND seq = 2") == 40
    assert await db.fetchval("SELECT count(*) FROM orphan_events") == 10
    assert await db.fetchval("SELECT sum(event_count) FROM orphans") == 10
    print(f"\n200 deliveries in {elapsed:.3f}s: {200 / elapsed:.0f} webhooks/s")


async def test_webhooks_of_one_job_wait_for_its_row_lock_while_other_jobs_proceed(
    client: Any, db: Database
) -> None:
    busy = await insert_job(db, job_id="busy")
    free = await insert_job(db, job_id="free")
    async with db.transaction() as conn:
        # someone else (a cancel, a delivery) holds the busy job's row
        await conn.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", busy)
        waiting = asyncio.ensure_future(
            client.post(IMAGE_ROUTE, **request(completed(busy), "msg-busy")))
        other = await client.post(IMAGE_ROUTE, **request(completed(free), "msg-free"))
        assert other.status == 200
        assert not waiting.done()
        assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 1
    resp = await waiting
    assert (resp.status, await resp.json()) == (200, {"outcome": "applied"})


def request(payload: Any, msg_id: str) -> dict[str, Any]:
    body, headers = signed(payload, WEBHOOK_KEY, msg_id)
    return {"data": body, "headers": headers}


class Proxy:
    """A TCP relay to PostgreSQL that the test can cut, as a network failure would."""

    def __init__(self, dsn: str) -> None:
        self._url = DatabaseURL.parse(dsn)
        socket_dir = self._url.socket_directory
        self._unix = f"{socket_dir}/.s.PGSQL.{self._url.port}" if socket_dir else None
        self._target = (self._url.host or "127.0.0.1", self._url.port)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def dsn(self) -> str:
        return str(self._url.with_tcp_address("127.0.0.1", self.port))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._unix:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._pipes |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[Proxy]:
    relay = Proxy(database_url)
    await relay.start()
    yield relay
    with contextlib.suppress(AssertionError):
        await relay.cut()


async def test_database_unreachable_is_503_with_retry_after_and_nothing_acknowledged(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], db: Database,
    proxy: Proxy,
) -> None:
    settings = make_settings(database_url=Secret(proxy.dsn), db_pool_min=1, db_pool_max=2)
    client = await aiohttp_client(create_app(settings))
    job_id = await insert_job(db)
    first = await client.post(IMAGE_ROUTE, **request(
        {"job_id": job_id, "status": "generating", "progress": 50}, "msg-before"))
    assert first.status == 200

    await proxy.cut()
    answers = []
    with structlog.testing.capture_logs() as logs:
        for msg_id, payload in [("msg-during", completed(job_id)),
                                ("msg-orphan", completed("backend-1"))]:
            resp = await client.post(IMAGE_ROUTE, **request(payload, msg_id))
            answers.append((resp.status, resp.headers.get("Retry-After"),
                            (await resp.json())["status"]))
    assert answers == [(503, "5", 503), (503, "5", 503)]
    # the log says why, for the operator
    reasons = [e.get("reason") for e in logs if e["event"] == "database_unavailable"]
    assert len(reasons) == 2
    assert all(r and r.startswith("database unavailable: ") for r in reasons), reasons
    # nothing of what was answered 503 is in the database
    keys = await db.fetch("SELECT dedupe_key FROM webhook_deliveries")
    assert [k["dedupe_key"] for k in keys] == ["id:msg-before"]
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "GENERATING"

    # the sender retries once the database is back: applied then, exactly once
    await proxy.start()
    resp = await client.post(IMAGE_ROUTE, **request(completed(job_id), "msg-during"))
    assert (resp.status, await resp.json()) == (200, {"outcome": "applied"})
    assert await db.fetchval("SELECT count(*) FROM notifications") == 1

