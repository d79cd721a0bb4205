"""Malformed HTTP sent as raw bytes to a served gateway: every way a request can break before
or while a handler reads it gets its 4xx as a problem document on a closed connection, one
warning line, never an error-level line; the gateway answers normal requests meanwhile, and
nothing is written."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import msgspec

from tests.reliability.conftest import Figures
from tests.reliability.served import RawResponse, read_response, served, table_digest
from tests.tokens import hs256_token

TOKEN = hs256_token("user_malformed", ttl=3600)
BODY_TIMEOUT = 1.0  # HTTP_BODY_TIMEOUT_SECONDS of the served gateway
MALFORMED = "http_request_malformed"
BODY_LATE = "http_body_timeout"
CREATE = (
    "POST /api/images/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
)
PROMPT = b'{"prompt": "a lighthouse at dusk"}'


@dataclasses.dataclass(frozen=True)
class Malformed:
    sent: tuple[bytes, ...]  # written one after the other, a moment apart
    status: int
    event: str = MALFORMED
    closes_early: bool = False  # the client half-closes: no answer can reach it


def _get(*header_lines: str, line: str = "GET /healthz HTTP/1.1") -> bytes:
    return "\r\n".join((line, "Host: 127.0.0.1", *header_lines, "", "")).encode("latin-1")


CASES = {
    "request line over HTTP_MAX_REQUEST_LINE_BYTES": Malformed(
        (_get(line=f"GET /api/notifications?cursor={'c' * 9000} HTTP/1.1"),), 414),
    "header field over HTTP_MAX_HEADER_FIELD_BYTES": Malformed(
        (_get(f"X-Padding: {'p' * 9000}"),), 431),
    "more header fields than 128": Malformed(
        (_get(*(f"X-Field-{i}: v" for i in range(200))),), 431),
    "header block over HTTP_MAX_HEADER_BYTES": Malformed(
        (_get(*(f"X-Padding-{i}: {'p' * 7000}" for i in range(5))),), 431),
    "bad method": Malformed((_get(line="G@T /healthz HTTP/1.1"),), 400),
    "bad version": Malformed((_get(line="GET /healthz HTTP/9.Z"),), 400),
    "invalid character in a header name": Malformed((_get("X-A\x01b: c"),), 400),
    "invalid character in a header value": Malformed((_get("X-A: b\x00c"),), 400),
    "header line without a colon": Malformed((_get("X-No-Colon"),), 400),
    "broken chunked body": Malformed(
        ((CREATE + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\nZZ\r\nxx\r\n").encode(),),
        400),
    "chunked body broken after the handler began reading it": Malformed(
        ((CREATE + "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n").encode(),
         b"ZZ\r\nxx\r\n"), 408, BODY_LATE),
    "body that is not the gzip its Content-Encoding says": Malformed(
        ((CREATE + "Content-Encoding: gzip\r\nContent-Length: 10\r\n\r\n0123456789").encode(),),
        400),
    "body shorter than Content-Length, client waiting": Malformed(
        ((CREATE + f"Content-Length: {len(PROMPT) + 50}\r\n\r\n").encode() + PROMPT,),
        408, BODY_LATE),
    "body shorter than Content-Length, client gone": Malformed(
        ((CREATE + f"Content-Length: {len(PROMPT) + 50}\r\n\r\n").encode() + PROMPT,),
        400, closes_early=True),
}


async def _send(port: int, case: Malformed) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for index, chunk in enumerate(case.sent):
        if index:
            await asyncio.sleep(0.3)  # the handler is reading the body by now
        writer.write(chunk)
        await writer.drain()
    if case.closes_early:
        writer.write_eof()
    return reader, writer


async def _healthz(port: int) -> int:
    """A normal request on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(_get("Connection: close"))
        await writer.drain()
        return (await read_response(reader)).status
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _answer(reader: asyncio.StreamReader) -> tuple[RawResponse | None, bool]:
    """The answer, if one came, and whether the server closed the connection after it."""
    try:
        response = await read_response(reader)
    except (ConnectionResetError, asyncio.IncompleteReadError):
        return None, True
    try:
        closed = await asyncio.wait_for(reader.read(1), timeout=5) == b""
    except ConnectionResetError:
        closed = True
    return response, closed


def _events(stderr: str, event: str) -> list[dict[str, object]]:
    found = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


async def test_each_malformed_request_gets_its_4xx_and_a_warning_never_an_error(
    database_url: str, figures: Figures
) -> None:
    before = await table_digest(database_url)
    answered: dict[str, int | None] = {}
    async with served(database_url, HTTP_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT)) as gw:
        logged = {MALFORMED: 0, BODY_LATE: 0}
        for name, case in CASES.items():
            reader, writer = await _send(gw.port, case)
            try:
                # the malformed connection is open, maybe waiting on its deadline
                assert await _healthz(gw.port) == 200, name
                response, closed = await asyncio.wait_for(
                    _answer(reader), timeout=BODY_TIMEOUT + 10)
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            logged[case.event] += 1
            await gw.proc.wait_log(f'"event": "{case.event}"', logged[case.event])
            answered[name] = None if response is None else response.status
            assert closed, name
            if case.closes_early:
                assert response is None, name
                continue
            assert response is not None, name
            assert response.status == case.status, (name, response.body[:300])
            assert response.headers["content-type"] == "application/problem+json", name
            assert response.headers["connection"] == "close", name
            problem = msgspec.json.decode(response.body)
            assert problem["status"] == case.status, name
            assert problem["detail"], name
        assert await _healthz(gw.port) == 200
    stderr = gw.proc.stderr
    errors = [line for line in stderr.splitlines() if '"level": "error"' in line]
    assert not errors, "\n".join(errors)[-3000:]
    assert '"level": "critical"' not in stderr
    assert "Traceback" not in stderr
    malformed = _events(stderr, MALFORMED)
    late = _events(stderr, BODY_LATE)
    # one line per request, no more
    assert len(malformed) == logged[MALFORMED]
    assert len(late) == logged[BODY_LATE]
    assert all(record["level"] == "warning" for record in [*malformed, *late])
    assert all(record["peer"] == "127.0.0.1" for record in malformed)
    too_long = next(r for r in malformed if r["status"] == 414)
    assert too_long["limit_bytes"] == 8190
    assert isinstance(too_long["request_line_bytes"], int)
    assert too_long["request_line_bytes"] > 8190
    block = next(r for r in malformed if "size_bytes" in r)
    assert (block["status"], block["limit_bytes"]) == (431, 32768)
    assert isinstance(block["size_bytes"], int)
    assert block["size_bytes"] > 32768
    assert block["request_id"]  # the request was parsed: it has an id
    assert await table_digest(database_url) == before
    figures["malformed requests sent"] = len(CASES)
    figures["answers"] = ", ".join(f"{name}: {status}" for name, status in answered.items())
    figures["warning lines"] = len(malformed) + len(late)
    figures["error lines"] = len(errors)
