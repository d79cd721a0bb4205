"""The simulated backend on its own: its answers, its webhooks (checked by the independent
standardwebhooks library), and the files it serves."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.simulator import SimulatedBackend, SimulatorConfig, parse_mix, parse_mode
from gateway.simulator.backend import ModeError
from tests.conftest import WEBHOOK_SECRET

Server = Callable[..., Awaitable[TestServer]]


class Receiver:
    """A gateway stand-in that verifies like a real one and records what arrived."""

    def __init__(self) -> None:
        self.verifier = standardwebhooks.Webhook(WEBHOOK_SECRET)
        self.received: list[tuple[str, dict[str, str], dict[str, Any]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/webhooks/{route}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = dict(request.headers)
        if "X-Webhook-Secret" not in headers:
            self.verifier.verify(body, {k.lower(): v for k, v in headers.items()})
        self.received.append((request.match_info["route"], headers, json.loads(body)))
        return web.json_response({"outcome": "applied"})


async def start(
    aiohttp_server: Server, mix: str = "honest", legacy: bool = False, step_delay: float = 0.01
) -> tuple[SimulatedBackend, TestServer, Receiver]:
    receiver = Receiver()
    gateway = await aiohttp_server(receiver.app())
    config = SimulatorConfig(
        webhook_base=str(gateway.make_url("")),
        webhook_secret=None if legacy else WEBHOOK_SECRET,
        legacy_secret="legacy-secret" if legacy else None,
        mix=parse_mix(mix),
        step_delay=step_delay,
    )
    backend = SimulatedBackend(config)
    server = await aiohttp_server(backend.app())
    backend.public_url = str(server.make_url("")).rstrip("/")
    return backend, server, receiver


async def generate(
    server: TestServer, kind: str = "images", key: str | None = None, **body: Any
) -> dict[str, Any]:
    payload = {"prompt": "un chat", "job_id": "job-1", "user_id": "user_a", **body}
    headers = {"Idempotency-Key": key} if key else {}
    async with aiohttp.ClientSession() as session, session.post(
        server.make_url(f"/api/{kind}/generate"), json=payload, headers=headers
    ) as resp:
        assert resp.status == 202
        answer: dict[str, Any] = await resp.json()
        return answer


async def lose_the_answer_and_retry(server: TestServer) -> dict[str, Any]:
    """Ask for job-1, lose the connection before the answer, and ask again with the same key."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await session.post(
                server.make_url("/api/images/generate"),
                json={"prompt": "x", "job_id": "job-1"},
                headers={"Idempotency-Key": "job-1"},
            )
    return await generate(server, key="job-1", prompt="x")


async def test_honest_answers_our_id_and_sends_the_signed_sequence(
    aiohttp_server: Server,
) -> None:
    backend, server, receiver = await start(aiohttp_server)
    answer = await generate(server)
    await backend.idle()
    assert answer["job_id"] == "job-1"
    assert [p["status"] for _, _, p in receiver.received] == [
        "initializing", "generating", "saving", "completed"]
    assert {route for route, _, _ in receiver.received} == {"image-completion"}
    done = receiver.received[-1][2]
    assert (done["user_id"], done["original_prompt"], done["progress"]) == (
        "user_a", "un chat", 100)
    (image,) = done["data"]["images"]
    async with aiohttp.ClientSession() as session, session.get(image["url"]) as resp:
        png = await resp.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) == image["size_bytes"]
    assert image["dimensions"] == "512x512"


async def test_own_uuid_ignores_the_given_job_id(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "own-uuid")
    answer = await generate(server)
    await backend.idle()
    assert answer["job_id"] != "job-1"
    assert {p["job_id"] for _, _, p in receiver.received} == {answer["job_id"]}


async def test_lost_answer_drops_the_connection_and_a_retry_gets_the_same_job(
    aiohttp_server: Server,
) -> None:
    backend, server, receiver = await start(aiohttp_server, "lost-answer")
    again = await lose_the_answer_and_retry(server)
    await backend.idle()
    assert again["job_id"] == "job-1"
    assert len(backend.jobs) == 1
    assert len(receiver.received) == 4


async def test_no_hints_leaves_only_the_description(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "no-hints")
    await generate(server)
    await backend.idle()
    for _, _, payload in receiver.received:
        assert "user_id" not in payload
        assert "original_prompt" not in payload
    assert receiver.received[-1][2]["data"]["images"][0]["description"] == "un chat"


async def test_duplicates_repeat_each_webhook_id_three_times(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "duplicates")
    await generate(server)
    await backend.idle()
    ids = [headers["webhook-id"] for _, headers, _ in receiver.received]
    assert len(ids) == 12
    assert all(ids.count(i) == 3 for i in ids)


async def test_out_of_order_shuffles_the_sequence(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "out-of-order")
    await generate(server, job_id="job-7")
    await backend.idle()
    statuses = [p["status"] for _, _, p in receiver.received]
    assert sorted(statuses) == ["completed", "generating", "initializing", "saving"]
    assert statuses != ["initializing", "generating", "saving", "completed"]


async def test_fail_ends_with_an_error_message(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "fail")
    await generate(server)
    await backend.idle()
    last = receiver.received[-1][2]
    assert last["status"] == "failed"
    assert "Quota" in last["error_message"]


async def test_legacy_mode_sends_the_shared_secret_header(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, legacy=True)
    await generate(server)
    await backend.idle()
    for _, headers, _ in receiver.received:
        assert headers["X-Webhook-Secret"] == "legacy-secret"
        assert "webhook-signature" not in {k.lower() for k in headers}


async def test_videos_are_real_mp4_files(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server)
    await generate(server, kind="videos", aspect_ratio="9:16")
    await backend.idle()
    route, _, done = receiver.received[-1]
    assert route == "video-completion"
    (video,) = done["data"]["videos"]
    async with aiohttp.ClientSession() as session, session.get(video["url"]) as resp:
        mp4 = await resp.read()
    assert mp4[4:8] == b"ftyp"
    assert (video["dimensions"], video["duration_seconds"]) == ("90x160", 8.0)


async def test_cancel_stops_the_sequence(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, step_delay=0.2)
    await generate(server)
    async with aiohttp.ClientSession() as session, session.post(
        server.make_url("/api/images/job-1/cancel")
    ) as resp:
        assert resp.status == 200
    await backend.idle()
    assert all(p["status"] != "completed" for _, _, p in receiver.received)


async def test_the_mix_is_taken_in_turn_and_markers_win(aiohttp_server: Server) -> None:
    backend, server, _ = await start(aiohttp_server, "honest,own-uuid")
    first = await generate(server, job_id="a")
    second = await generate(server, job_id="b")
    marked = await generate(server, job_id="c", prompt="chat [sim:own-uuid]")
    await asyncio.wait_for(backend.idle(), 10)
    assert first["job_id"] == "a"
    assert second["job_id"] != "b"
    assert marked["job_id"] != "c"


def test_unknown_modes_are_refused() -> None:
    assert parse_mode("own-uuid+no-hints") == {"own-uuid", "no-hints"}
    with pytest.raises(ModeError):
        parse_mode("sideways")


async def test_a_lost_own_id_never_reaches_the_caller(aiohttp_server: Server) -> None:
    backend, server, receiver = await start(aiohttp_server, "own-uuid+lost-answer")
    again = await lose_the_answer_and_retry(server)
    await backend.idle()
    (backend_id,) = backend.jobs
    assert again["job_id"] == "job-1"
    assert backend_id != "job-1"
    assert {p["job_id"] for _, _, p in receiver.received} == {backend_id}
