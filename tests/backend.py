"""A scripted generator backend: a real aiohttp server with the backend's routes.

Each call takes the next reply scripted for its job (status, Retry-After, a hang, a dropped
connection, another job id, an answer lost after the job was taken), else the default. It
answers a repeated Idempotency-Key with the id it gave first, like the real backend. It
records every call, and how many calls for one job were in flight at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 202
    retry_after: str | None = None
    # seconds before answering; math.inf: until the caller gives up and hangs up
    hang: float = 0.0
    # hang up without answering; the job is not taken
    drop: bool = False
    # take the job, then hang up without answering
    lose_answer: bool = False
    # answer this id instead of the caller's (the backend's own UUID)
    own_id: str | None = None
    # a JSON body of its own (error answers)
    body: Any = None


ACCEPT = Reply()


def status(code: int, **changes: Any) -> Reply:
    return Reply(status=code, **changes)


@dataclasses.dataclass
class Call:
    action: str
    kind: str
    # the caller's job id: from the body for generate, from the id in the path for cancel
    job_id: str
    path_id: str | None
    headers: Mapping[str, str]
    body: Any
    reply: Reply
    started: float  # monotonic
    wall: float  # time.time(), to compare with database timestamps
    ended: float | None = None


class ScriptedBackend:
    def __init__(self, default: Reply | Callable[[Call], Reply] = ACCEPT) -> None:
        self.default = default
        self.calls: list[Call] = []
        self.accepted: dict[str, str] = {}  # our job id -> the id it was accepted under
        self.cancelled: set[str] = set()
        self.max_concurrent: collections.Counter[str] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._scripts: dict[tuple[str, str], collections.deque[Reply]] = {}
        self._by_backend_id: dict[str, str] = {}
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post("/api/{kind:images|videos}/generate", self._generate)
        self.app.router.add_post("/api/{kind:images|videos}/{job_id}/cancel", self._cancel)

    async def start(self, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
        """Serve on a free port (the test server cancels a handler whose caller hangs up)."""
        server = await aiohttp_server(self.app)
        self.url = str(server.make_url("")).rstrip("/")
        return self.url

    def script(self, job_id: str, *replies: Reply, action: str = "generate") -> None:
        self._scripts.setdefault((action, job_id), collections.deque()).extend(replies)

    def calls_for(self, job_id: str, action: str = "generate") -> list[Call]:
        return [c for c in self.calls if c.job_id == job_id and c.action == action]

    @property
    def most_concurrent(self) -> int:
        """The most calls for one job that were ever in flight together."""
        return max(self.max_concurrent.values(), default=0)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        given = body.get("job_id") if isinstance(body, dict) else None
        job_id = given if isinstance(given, str) else request.headers.get("Idempotency-Key", "")
        return await self._answer(request, "generate", job_id, None, body)

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        path_id = request.match_info["job_id"]
        body = await _json(request)
        job_id = self._by_backend_id.get(path_id, path_id)
        return await self._answer(request, "cancel", job_id, path_id, body)

    async def _answer(
        self, request: web.Request, action: str, job_id: str, path_id: str | None, body: Any
    ) -> web.StreamResponse:
        call = Call(
            action=action,
            kind=request.match_info["kind"],
            job_id=job_id,
            path_id=path_id,
            headers=dict(request.headers),
            body=body,
            reply=ACCEPT,
            started=time.monotonic(),
            wall=time.time(),
        )
        call.reply = self._next_reply(call)
        self.calls.append(call)
        self._in_flight[job_id] += 1
        self.max_concurrent[job_id] = max(self.max_concurrent[job_id], self._in_flight[job_id])
        try:
            return await self._play(request, call)
        finally:
            self._in_flight[job_id] -= 1
            call.ended = time.monotonic()

    def _next_reply(self, call: Call) -> Reply:
        queue = self._scripts.get((call.action, call.job_id))
        if queue:
            return queue.popleft()
        return self.default(call) if callable(self.default) else self.default

    async def _play(self, request: web.Request, call: Call) -> web.StreamResponse:
        reply = call.reply
        if reply.hang == math.inf:
            await asyncio.Event().wait()
        elif reply.hang:
            await asyncio.sleep(reply.hang)
        if reply.drop:
            return _hang_up(request)
        if not (200 <= reply.status < 300 or reply.lose_answer):
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
            answer = reply.body if reply.body is not None else {"error": f"scripted {reply.status}"}
            return web.json_response(answer, status=reply.status, headers=headers)
        if call.action == "cancel":
            self.cancelled.add(call.job_id)
            answer = {"job_id": call.path_id, "status": "cancelled"}
        else:
            # the same Idempotency-Key gets the id it got the first time
            backend_id = self.accepted.setdefault(call.job_id, reply.own_id or call.job_id)
            self._by_backend_id[backend_id] = call.job_id
            answer = {"job_id": backend_id, "status": "queued", "message": "accepted"}
        if reply.lose_answer:
            return _hang_up(request)
        return web.json_response(reply.body if reply.body is not None else answer,
                                 status=reply.status)


def _hang_up(request: web.Request) -> web.StreamResponse:
    assert request.transport is not None
    request.transport.close()
    return web.Response()


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


async def eventually(
    check: Callable[[], Awaitable[bool]], *, timeout: float = 15.0, every: float = 0.02
) -> None:
    """Poll until `check` holds; fail with AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(every)
