"""Read deadlines, so slow clients cannot hold connections and handlers forever.

aiohttp bounds neither how long a client may take to send a request head nor how long it
may take to send the body. Two deadlines close that gap:

- the head: a connection must send a complete request head within
  `HTTP_HEADER_TIMEOUT_SECONDS` of opening, or of the first byte of its next request when
  kept alive; otherwise it is answered 408 and closed. This wraps each connection's
  protocol (`DeadlineSite`), because no handler runs before the head is complete.
- the body: once the head is in, the whole body must arrive within
  `HTTP_BODY_TIMEOUT_SECONDS`; otherwise the read fails with `RequestTimeout` (408) and
  the connection is closed (`body_deadline_middleware`).
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import keys
from gateway.errors import ProblemError

log = structlog.get_logger(__name__)

_HEAD_TIMEOUT_ANSWER: Final = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
)


class RequestTimeout(ProblemError, TimeoutError):
    """The request body was not received in time."""

    status = 408
    slug = "request-timeout"
    title = "Request Timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class HeadDeadlineProtocol(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection: closes it when a head is late.

    Armed when the connection opens and when the first byte of a later request arrives;
    disarmed when a handler starts (the head is complete: `body_deadline_middleware`
    tells it). An idle kept-alive connection is left to aiohttp's keep-alive timeout.
    """

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._idle = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._idle and data:
            self._idle = False
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._transport = None
        self._inner.connection_lost(exc)

    def request_started(self) -> None:
        self._disarm()
        self._in_request = True
        self._idle = False

    def request_finished(self) -> None:
        self._in_request = False
        self._idle = True

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or self._in_request or transport.is_closing():
            return
        log.warning("http_head_timeout", timeout_seconds=self._timeout,
                    peer=_peer(transport))
        transport.write(_HEAD_TIMEOUT_ANSWER)
        transport.close()


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class DeadlineSite(web.BaseSite):
    """A TCP site whose connections get a request-head deadline."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        head_timeout: float,
        reuse_port: bool,
        backlog: int,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._head_timeout = head_timeout
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        timeout = self._head_timeout
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HeadDeadlineProtocol(server(), timeout),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port,
        )


@web.middleware
async def body_deadline_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if isinstance(protocol, HeadDeadlineProtocol):
        protocol.request_started()
    timer = None
    if request.body_exists:
        timeout = request.config_dict[keys.SETTINGS].http_body_timeout_seconds
        timer = asyncio.get_running_loop().call_later(timeout, _expire_body, request, timeout)
    try:
        return await handler(request)
    finally:
        if timer is not None:
            timer.cancel()
        if isinstance(protocol, HeadDeadlineProtocol):
            protocol.request_finished()


def _expire_body(request: web.Request, timeout: float) -> None:
    if request.content.is_eof():
        return
    log.warning("http_body_timeout", method=request.method, path=request.path,
                timeout_seconds=timeout)
    # A pending or later read raises this; it is a TimeoutError, so aiohttp's lingering
    # read after the 408 treats it as a timeout and closes the connection quietly.
    request.content.set_exception(
        RequestTimeout(f"The request body was not received within {timeout:g} s.")
    )
