"""Limits of a served gateway: body size before any HMAC, Content-Type, memory under 100
concurrent 10 MB uploads, and slow clients that trickle heads or bodies byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import msgspec

from tests.conftest import WEBHOOK_KEY
from tests.metrics_helpers import Scrape
from tests.reliability.conftest import Figures
from tests.reliability.served import (
    memory_kib,
    raw_request,
    read_response,
    served,
    table_digest,
    webhook_head,
)
from tests.signing import sign, signed
from tests.tokens import hs256_token

IMAGE = "/api/webhooks/image-completion"
VIDEO = "/api/webhooks/video-completion"
LIMIT = 1024 * 1024  # WEBHOOK_MAX_BODY_BYTES by default
UPLOADS = 100
UPLOAD_BYTES = 10 * 1024 * 1024
# Each upload may hold at most the 1 MiB limit (plus a read buffer) in memory before its
# 413, so 100 at once may cost about 100 MiB beyond the idle process; buffering them whole
# would cost 1,000 MiB. The bound leaves room for the parser's and allocator's slack.
RSS_BOUND_KIB = 160 * 1024


def orphan_payload(n: int = 0) -> dict[str, Any]:
    return {"job_id": f"bk-limits-{n}", "status": "generating", "progress": 60}


async def scrape(base: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as resp:
        return Scrape(await resp.text())


async def test_body_one_byte_over_the_limit_is_413_before_any_hmac(
    database_url: str, figures: Figures
) -> None:
    async with served(database_url) as gw:
        before = await table_digest(database_url)
        over = b"x" * (LIMIT + 1)
        at_limit = b"x" * LIMIT
        ts = int(time.time())
        cases = {
            # a valid signature over an oversized body: refused for its size, not parsed
            "over, signed": (over, sign(over, WEBHOOK_KEY, "msg_over_ok", ts)),
            "over, bad signature": (over, sign(over, b"k" * 32, "msg_over_bad", ts)),
            "over, no signature": (over, {"Content-Type": "application/json"}),
        }
        statuses = {}
        for name, (body, headers) in cases.items():
            resp = await raw_request(gw.port, webhook_head(IMAGE, dict(headers), len(body)),
                                     body)
            statuses[name] = resp.status
        # the same body one byte shorter gets as far as the signature
        resp = await raw_request(
            gw.port, webhook_head(IMAGE, sign(at_limit, b"k" * 32, "msg_at", ts), LIMIT),
            at_limit)
        statuses["at limit, bad signature"] = resp.status
        # declared over the limit: answered without waiting for a body that never comes
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        started = time.monotonic()
        writer.write(webhook_head(IMAGE, sign(b"", WEBHOOK_KEY, "msg_declared", ts), LIMIT + 1)
                     + b"\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            declared = await read_response(reader)
        declared_seconds = time.monotonic() - started
        writer.close()
        statuses["declared over, no body sent"] = declared.status
        # chunked: counted while streaming, refused at the byte past the limit
        chunked = await _chunked_upload(gw.port, IMAGE, LIMIT + 1, chunk=64 * 1024)
        statuses["chunked over"] = chunked
        metrics = await scrape(gw.base)
        after = await table_digest(database_url)

    figures["requests over the limit"] = 5
    figures["answered 413"] = sum(1 for s in statuses.values() if s == 413)
    figures["declared-over answer seconds"] = round(declared_seconds, 3)
    figures["too_large counted"] = metrics.get("sorami_webhooks_total", kind="image",
                                               outcome="too_large")
    figures["invalid_signature counted"] = metrics.get("sorami_webhooks_total", kind="image",
                                                       outcome="invalid_signature")
    assert statuses == {
        "over, signed": 413, "over, bad signature": 413, "over, no signature": 413,
        "at limit, bad signature": 401, "declared over, no body sent": 413,
        "chunked over": 413,
    }
    # no HMAC ran for the five oversized requests: the only signature checked is at limit
    assert figures["too_large counted"] == 5
    assert figures["invalid_signature counted"] == 1
    assert after == before


async def test_wrong_content_type_is_415_and_changes_nothing(
    database_url: str, figures: Figures
) -> None:
    types: list[str | None] = ["text/plain", "application/xml", "multipart/form-data; b=x",
                               "application/x-www-form-urlencoded", "application/jsonx",
                               "", None]
    async with served(database_url) as gw:
        before = await table_digest(database_url)
        statuses = []
        for n, content_type in enumerate(types):
            body, headers = signed(orphan_payload(n), WEBHOOK_KEY, f"msg_ct_{n}")
            sent: dict[str, bytes | str] = dict(headers)
            del sent["Content-Type"]
            if content_type is not None:
                sent["Content-Type"] = content_type
            for route in (IMAGE, VIDEO):
                resp = await raw_request(gw.port, webhook_head(route, sent, len(body)), body)
                statuses.append(resp.status)
        after = await table_digest(database_url)
    figures["requests with a wrong Content-Type"] = len(statuses)
    figures["answered 415"] = statuses.count(415)
    assert statuses == [415] * len(types) * 2
    assert after == before


async def _chunked_upload(port: int, route: str, size: int, chunk: int) -> int:
    """POST `size` bytes with chunked encoding until the server answers; its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nwebhook-id: msg_upload\r\n"
            f"webhook-timestamp: {int(time.time())}\r\nwebhook-signature: v1,AAAA\r\n\r\n")

    async def send() -> None:
        writer.write(head.encode())
        block = f"{chunk:x}\r\n".encode() + b"7" * chunk + b"\r\n"
        sent = 0
        while sent < size:
            part = min(chunk, size - sent)
            writer.write(block if part == chunk else f"{part:x}\r\n".encode()
                         + b"7" * part + b"\r\n")
            await writer.drain()
            sent += part
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(60):
            response = await read_response(reader)
        return response.status
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()


async def test_100_concurrent_10_mb_uploads_keep_rss_bounded(
    database_url: str, figures: Figures
) -> None:
    async with served(database_url) as gw:
        # warm up the code paths once so the baseline is a serving process's
        await _chunked_upload(gw.port, IMAGE, 2 * LIMIT, chunk=64 * 1024)
        rss_before, _ = memory_kib(gw.pid)
        peak = rss_before
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, memory_kib(gw.pid)[0])
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        statuses = await asyncio.gather(*(
            _chunked_upload(gw.port, IMAGE if n % 2 else VIDEO, UPLOAD_BYTES, chunk=256 * 1024)
            for n in range(UPLOADS)
        ))
        took = time.monotonic() - started
        stop.set()
        await sampler
        rss_after, hwm = memory_kib(gw.pid)
        peak = max(peak, hwm)
        await asyncio.sleep(0)  # the server still answers afterwards
        ready = await raw_request(gw.port, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1")

    figures["uploads"] = UPLOADS
    figures["upload MiB each"] = UPLOAD_BYTES // (1024 * 1024)
    figures["answered 413"] = statuses.count(413)
    figures["RSS before MiB"] = round(rss_before / 1024, 1)
    figures["RSS peak MiB"] = round(peak / 1024, 1)
    figures["RSS after MiB"] = round(rss_after / 1024, 1)
    figures["RSS bound MiB"] = f"before + {RSS_BOUND_KIB // 1024}"
    figures["burst seconds"] = round(took, 2)
    assert statuses == [413] * UPLOADS
    assert peak - rss_before < RSS_BOUND_KIB
    assert ready.status == 200


HEAD_TIMEOUT = 3.0
BODY_TIMEOUT = 3.0
SLOW_HEADS = 150
SLOW_BODIES = 150
SLOW_KEPT_ALIVE = 20
SLOW_API_BODIES = 20
TRICKLE_SECONDS = 0.25
# generous: a normal request on this shared machine answers in milliseconds
NORMAL_BOUND_SECONDS = 5.0
# the server must close a slow connection within its deadline plus this
CLOSE_SLACK_SECONDS = 5.0


async def _trickle(port: int, head: bytes, drip: bytes, give_up: float,
                   kept_alive: bool = False) -> tuple[float, int]:
    """Send `head` then `drip` one byte at a time until the server closes the connection;
    (seconds it stayed open, status answered or 0). `kept_alive`: first one whole request
    on the connection, answered, and only then the slow one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if kept_alive:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        async with asyncio.timeout(give_up):
            first = await read_response(reader)
        assert first.status == 200
    started = time.monotonic()
    writer.write(head)

    async def drip_bytes() -> None:
        for n in range(10**6):
            writer.write(drip[n % len(drip): n % len(drip) + 1])
            await writer.drain()
            await asyncio.sleep(TRICKLE_SECONDS)

    dripper = asyncio.create_task(drip_bytes())
    data = b""
    try:
        async with asyncio.timeout(give_up):
            # closed: an end of stream, or a reset when the server closed with our drips
            # still unread (the answer before it may then be lost)
            with contextlib.suppress(ConnectionResetError):
                while chunk := await reader.read(65536):
                    data += chunk
        status = int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else 0
        return time.monotonic() - started, status
    except TimeoutError:
        return float("inf"), 0
    finally:
        dripper.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await dripper
        writer.close()


async def test_slow_clients_cannot_starve_normal_requests(
    database_url: str, figures: Figures
) -> None:
    env = {"HTTP_HEADER_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
           "HTTP_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT)}
    give_up = max(HEAD_TIMEOUT, BODY_TIMEOUT) + CLOSE_SLACK_SECONDS
    async with served(database_url, **env) as gw:
        slow_head = b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        body_head = webhook_head(IMAGE, sign(b"", WEBHOOK_KEY, "msg_slow", int(time.time())),
                                 100_000) + b"\r\n\r\n"
        api_head = (b"POST /api/images/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 5000\r\n"
                    b"Authorization: Bearer " + hs256_token("user_slow").encode() + b"\r\n\r\n")
        attack = [
            *(asyncio.create_task(_trickle(gw.port, slow_head, b"X-Slow: a\r\n", give_up))
              for _ in range(SLOW_HEADS)),
            *(asyncio.create_task(_trickle(gw.port, body_head, b'{"a": 1} ', give_up))
              for _ in range(SLOW_BODIES)),
            *(asyncio.create_task(_trickle(gw.port, slow_head, b"X-Slow: a\r\n", give_up,
                                           kept_alive=True))
              for _ in range(SLOW_KEPT_ALIVE)),
            *(asyncio.create_task(_trickle(gw.port, api_head, b'{"prompt": "x"} ', give_up))
              for _ in range(SLOW_API_BODIES)),
        ]
        await asyncio.sleep(0.5)  # every slow connection is open and dripping
        latencies = []
        answers = []
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + min(HEAD_TIMEOUT, BODY_TIMEOUT) - 1.0
            n = 0
            while time.monotonic() < deadline:
                n += 1
                body, headers = signed(orphan_payload(n), WEBHOOK_KEY, f"msg_{uuid.uuid4()}")
                started = time.monotonic()
                async with asyncio.timeout(NORMAL_BOUND_SECONDS):
                    async with session.post(f"{gw.base}{IMAGE}", data=body,
                                            headers=headers) as resp:
                        answers.append((resp.status, msgspec.json.decode(await resp.read())))
                    async with session.get(f"{gw.base}/readyz") as ready:
                        answers.append((ready.status, {}))
                latencies.append(time.monotonic() - started)
        results = await asyncio.gather(*attack)
        heads = results[:SLOW_HEADS] + results[SLOW_HEADS + SLOW_BODIES:][:SLOW_KEPT_ALIVE]
        bodies = results[SLOW_HEADS:SLOW_HEADS + SLOW_BODIES] + results[-SLOW_API_BODIES:]
        orphans = await _count(database_url, "SELECT count(*) FROM orphans")

    figures["slow header connections"] = f"{SLOW_HEADS} new + {SLOW_KEPT_ALIVE} kept alive"
    figures["slow body connections"] = f"{SLOW_BODIES} webhook + {SLOW_API_BODIES} client API"
    figures["header / body deadline seconds"] = f"{HEAD_TIMEOUT:g} / {BODY_TIMEOUT:g}"
    figures["normal request pairs under attack"] = len(latencies)
    figures["normal latency p50 s"] = round(statistics.median(latencies), 4)
    figures["normal latency max s"] = round(max(latencies), 4)
    figures["slow heads closed by the server"] = sum(1 for t, _ in heads if t != float("inf"))
    figures["slow heads answered 408"] = sum(1 for _, s in heads if s == 408)
    figures["slow heads held max s"] = round(max(t for t, _ in heads), 2)
    figures["slow bodies closed by the server"] = sum(1 for t, _ in bodies if t != float("inf"))
    figures["slow bodies answered 408"] = sum(1 for _, s in bodies if s == 408)
    figures["slow bodies held max s"] = round(max(t for t, _ in bodies), 2)

    assert len(latencies) >= 5
    assert all(status in (200, 202) for status, _ in answers)
    assert orphans == len(latencies)
    assert max(latencies) < NORMAL_BOUND_SECONDS
    # every slow connection was closed by the server, no sooner than its deadline
    assert all(HEAD_TIMEOUT - 0.5 <= t < HEAD_TIMEOUT + CLOSE_SLACK_SECONDS for t, _ in heads)
    assert all(BODY_TIMEOUT - 0.5 <= t < BODY_TIMEOUT + CLOSE_SLACK_SECONDS for t, _ in bodies)
    # an answer that arrived is the 408 (a reset may swallow it)
    assert {s for _, s in heads} <= {408, 0}
    assert {s for _, s in bodies} <= {408, 0}


async def _count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        value: int = await conn.fetchval(sql)
        return value
    finally:
        await conn.close()
