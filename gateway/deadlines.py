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
from gateway.malformed import HeadSoFar, ProblemRequestHandler

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

    It also counts the bytes of the head being read (`head_so_far`), which tell an
    over-long request line from an over-long header field when the parser refuses one.
    """

    def __init__(self, inner: asyncio.Protocol, timeout: float) -> None:
        self._inner = inner
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._idle = False
        # None once bytes arrive while a handler runs: a body, or a pipelined request
        self._head: _HeadCount | None = _HeadCount()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._idle and data:
            self._idle = False
            self._arm()
            self._head = _HeadCount()
        elif self._in_request:
            self._head = None
        if self._head is not None:
            self._head.add(data)
        self._inner.data_received(data)

    def head_so_far(self) -> HeadSoFar | None:
        """The request line's and the head's bytes so far; None when they are not known."""
        head = self._head
        if head is None:
            return None
        return HeadSoFar(request_line_bytes=head.line, received_bytes=head.received)

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


class _HeadCount:
    """Bytes of one request head: all of them, and those of its first line."""

    __slots__ = ("line", "line_done", "received")

    def __init__(self) -> None:
        self.line = 0
        self.line_done = False
        self.received = 0

    def add(self, data: bytes) -> None:
        self.received += len(data)
        if self.line_done:
            return
        end = data.find(b"\n")
        if end < 0:
            self.line += len(data)
        else:
            self.line_done = True
            self.line += end
            if end > 0 and data[end - 1] == 0x0D:  # CR
                self.line -= 1


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class DeadlineSite(web.BaseSite):
    """A TCP site whose connections get a request-head deadline, and whose malformed
    requests are answered as problems (`ProblemRequestHandler`)."""

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
        loop = asyncio.get_running_loop()
        # what `server()` would build, with the gateway's handle_error; the keyword
        # arguments are the runner's and the app's `handler_args` (the parser's limits)
        handler_kwargs = server._kwargs
        self._server = await loop.create_server(
            lambda: HeadDeadlineProtocol(
                ProblemRequestHandler(server, loop=loop, **handler_kwargs), timeout
            ),
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
