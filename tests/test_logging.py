"""Logs: JSON off a terminal, a request id on every request's lines, never a secret."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.jobs.prompts import fingerprint
from gateway.logging import REDACTED, redact_secrets, summarize_prompts
from gateway.observability import REQUEST_ID_HEADER, bind_context
from tests.conftest import HS256_SECRET, WEBHOOK_SECRET
from tests.pg import refusing_connections
from tests.procs import Proc, clean_env, free_port, start, wait_ready

Client = TestClient[web.Request, web.Application]
GENERATED_ID = re.compile(r"[0-9a-f]{32}")

LOG_ONE_LINE = (
    "import structlog; from gateway.logging import configure; configure('info'); "
    "structlog.get_logger().info('hello', job_id='job-1', prompt='a cat in sunglasses')"
)


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def redact(**event: Any) -> dict[str, Any]:
    return dict(redact_secrets(None, "info", event))


def test_values_under_secret_bearing_keys_are_redacted() -> None:
    out = redact(
        event="delivery_failed",
        job_id="job-1",
        authorization="Bearer abc",
        api_key="k",
        backend_api_key="k",
        password="p",
        access_token="t",
        headers={
            "Authorization": "Bearer abc",
            "webhook-signature": "v1,c2ln",
            "X-Webhook-Secret": "shh",
            "Content-Type": "application/json",
        },
        attempts=[{"secret": "s", "status": 503}],
    )
    assert out["event"] == "delivery_failed"
    assert out["job_id"] == "job-1"
    for key in ("authorization", "api_key", "backend_api_key", "password", "access_token"):
        assert out[key] == REDACTED, key
    assert out["headers"] == {
        "Authorization": REDACTED,
        "webhook-signature": REDACTED,
        "X-Webhook-Secret": REDACTED,
        "Content-Type": "application/json",
    }
    assert out["attempts"] == [{"secret": REDACTED, "status": 503}]


def test_credentials_inside_strings_are_redacted() -> None:
    token = jwt.encode({"sub": "user_a"}, HS256_SECRET, algorithm="HS256")
    message = (
        f"backend said no to Bearer sk-live-123; token {token}; "
        f"secret {WEBHOOK_SECRET}; sig v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=; "
        "dsn postgresql://sorami:hunter2@db:5432/sorami"
    )
    out = redact(event="backend_refused", error=message)["error"]
    for leaked in ("sk-live-123", token, WEBHOOK_SECRET, "K5oZfzN95Z9UVu1", "hunter2"):
        assert leaked not in out
    assert out.startswith("backend said no to Bearer [REDACTED]; token [REDACTED]")
    assert "postgresql://sorami:[REDACTED]@db:5432/sorami" in out


def test_prompts_are_logged_as_length_and_hash_at_info() -> None:
    prompt = "a cat in sunglasses"
    out = summarize_prompts(None, "info", {"event": "job_created", "prompt": prompt})
    assert out == {
        "event": "job_created",
        "prompt_length": len(prompt),
        "prompt_hash": fingerprint(prompt),
    }
    debug = summarize_prompts(None, "debug", {"event": "job_created", "prompt": prompt})
    assert debug["prompt"] == prompt


def test_json_lines_when_stderr_is_not_a_terminal() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOG_ONE_LINE],
        capture_output=True, text=True, timeout=30, check=True,
    )
    (line,) = json_lines(result.stderr)
    assert line["event"] == "hello"
    assert line["job_id"] == "job-1"
    assert line["level"] == "info"
    assert line["pid"] > 0
    assert "timestamp" in line
    assert "a cat in sunglasses" not in result.stderr
    assert line["prompt_hash"] == fingerprint("a cat in sunglasses")


def test_readable_console_lines_on_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOG_ONE_LINE],
            stderr=follower, stdout=subprocess.DEVNULL, timeout=30, check=True,
        )
        assert proc.returncode == 0
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            output += chunk
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())  # colours off
    assert "hello" in text
    assert "job_id=job-1" in text
    assert not text.lstrip().startswith("{")


async def test_a_sane_request_id_is_echoed(client: Client) -> None:
    resp = await client.get("/healthz", headers={REQUEST_ID_HEADER: "req-7f3a:retry/2"})
    assert resp.headers[REQUEST_ID_HEADER] == "req-7f3a:retry/2"


async def test_a_request_id_is_generated_when_absent(client: Client) -> None:
    first = (await client.get("/healthz")).headers[REQUEST_ID_HEADER]
    second = (await client.get("/healthz")).headers[REQUEST_ID_HEADER]
    assert GENERATED_ID.fullmatch(first)
    assert first != second


async def test_an_insane_request_id_is_replaced(client: Client) -> None:
    for bad in ("x" * 129, "two words", "caf\u00e9", ""):
        resp = await client.get("/healthz", headers={REQUEST_ID_HEADER: bad})
        assert GENERATED_ID.fullmatch(resp.headers[REQUEST_ID_HEADER]), bad


async def test_error_and_streamed_responses_carry_the_request_id(
    aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: hi\n\n")
        return response

    app.router.add_get("/stream", stream)
    client: Client = await aiohttp_client(app)
    streamed = await client.get("/stream", headers={REQUEST_ID_HEADER: "req-stream"})
    assert streamed.headers[REQUEST_ID_HEADER] == "req-stream"
    assert await streamed.text() == "data: hi\n\n"
    missing = await client.get("/nowhere", headers={REQUEST_ID_HEADER: "req-404"})
    assert missing.status == 404
    assert missing.headers[REQUEST_ID_HEADER] == "req-404"


async def test_context_bound_in_one_request_does_not_reach_the_next(
    aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    async def bind(request: web.Request) -> web.Response:
        bind_context(job_id="job-1", webhook_id="msg_1", user_id="user_a")
        return web.json_response(structlog.contextvars.get_contextvars())

    async def peek(request: web.Request) -> web.Response:
        return web.json_response(structlog.contextvars.get_contextvars())

    app.router.add_get("/bind", bind)
    app.router.add_get("/peek", peek)
    client: Client = await aiohttp_client(app)
    bound = await (await client.get("/bind", headers={REQUEST_ID_HEADER: "req-1"})).json()
    assert bound == {
        "request_id": "req-1", "job_id": "job-1", "webhook_id": "msg_1", "user_id": "user_a"
    }
    # the test client keeps the connection alive: both requests run in one server task
    after = await (await client.get("/peek", headers={REQUEST_ID_HEADER: "req-2"})).json()
    assert after == {"request_id": "req-2"}


def serve(database_url: str, port: int, **env: str) -> Proc:
    return start(["serve"], clean_env(
        DATABASE_URL=database_url, WEBHOOK_SECRETS=WEBHOOK_SECRET,
        AUTH_HS256_SECRET=HS256_SECRET, PORT=str(port), **env,
    ))


async def test_each_request_logs_one_access_line_with_its_own_request_id(
    database_url: str,
) -> None:
    port = free_port()
    proc = serve(database_url, port)
    try:
        await wait_ready(port)
        # one keep-alive connection: the second request must not inherit the first's id
        async with aiohttp.ClientSession() as session:
            async with session.get(
                f"http://127.0.0.1:{port}/api/images/job-1/nothing",
                headers={REQUEST_ID_HEADER: "req-first"},
            ) as resp:
                assert resp.status == 404
            async with session.get(f"http://127.0.0.1:{port}/no/such") as resp:
                second_id = resp.headers[REQUEST_ID_HEADER]
        await proc.wait_log('"event": "http_request"', count=2)
    finally:
        code, err = proc.stop()
    assert code == 0, err
    first, second = [line for line in json_lines(err) if line["event"] == "http_request"]
    assert first["request_id"] == "req-first"
    assert (first["method"], first["route"], first["status"]) == ("GET", "unmatched", 404)
    assert first["path"] == "/api/images/job-1/nothing"
    assert isinstance(first["duration_ms"], float)
    assert first["level"] == "info"
    assert second["request_id"] == second_id != "req-first"
    # lines logged outside any request carry no request id
    assert all("request_id" not in line for line in json_lines(err)
               if line["event"] in ("serving", "stopped"))


async def test_lines_logged_while_handling_a_request_carry_its_id(
    database_url: str,
) -> None:
    port = free_port()
    proc = serve(database_url, port)
    try:
        await wait_ready(port)
        async with refusing_connections(database_url):
            async with aiohttp.ClientSession() as session, session.get(
                f"http://127.0.0.1:{port}/metrics", headers={REQUEST_ID_HEADER: "req-scrape"}
            ) as resp:
                assert resp.status == 200
            await proc.wait_log('"request_id": "req-scrape"')
    finally:
        code, err = proc.stop()
    assert code == 0, err
    during = {line["event"] for line in json_lines(err) if line.get("request_id") == "req-scrape"}
    # which of the two depends on how the driver notices the dead connection
    assert during & {"metrics_database_unavailable", "metrics_database_query_failed"}


async def test_secrets_never_reach_the_logs(database_url: str) -> None:
    backend_key = "sk-backend-0123456789abcdef"
    legacy = "legacy-shared-secret-0123456789"
    token = jwt.encode({"sub": "user_a"}, HS256_SECRET, algorithm="HS256")
    port = free_port()
    proc = serve(
        database_url, port, LOG_LEVEL="debug", BACKEND_API_KEY=backend_key,
        LEGACY_WEBHOOK_SECRET=legacy, BACKEND_URL="http://127.0.0.1:9",
    )
    try:
        await wait_ready(port)
        headers = {
            "Authorization": f"Bearer {token}",
            "webhook-id": "msg_1",
            "webhook-timestamp": "1700000000",
            "webhook-signature": "v1,K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
            "X-Webhook-Secret": legacy,
        }
        async with aiohttp.ClientSession() as session:
            for path in ("/api/webhooks/image-completion", "/api/images/user", "/metrics"):
                async with session.post(f"http://127.0.0.1:{port}{path}", headers=headers):
                    pass
        await proc.wait_log('"event": "http_request"', count=3)
    finally:
        code, err = proc.stop()
    assert code == 0, err
    assert len([line for line in json_lines(err) if line["event"] == "http_request"]) >= 3
    for secret in (token, HS256_SECRET, WEBHOOK_SECRET, backend_key, legacy,
                   "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN"):
        assert secret not in err
