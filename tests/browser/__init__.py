"""A real browser against the gateway: Debian's chromium driven by Playwright, test origins.

`Front` is a test origin, a real aiohttp server: it serves `page.html` (what the app's pages
do) and/or forwards `/api/...` to the gateway the way the app's reverse proxy does, streaming
answers as they come. It records what it forwarded, can cut the streams it is forwarding (a
dropped connection, as a mobile network or a proxy restart drops it), and can hold new event
streams back until told (so that a change lands while the page is disconnected).

Playwright only drives the chromium that Debian installs (`/usr/bin/chromium`); nothing is
downloaded. Without it the browser tests skip, saying how to install it, except under
`CI=true`, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

CHROMIUM = Path("/usr/bin/chromium")
PAGE = Path(__file__).with_name("page.html")
# screenshots of each page at the end of its test (gitignored)
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
# headless, root in a container, and no call home: this machine's network is closed
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
INSTALL_HINT = (
    "Debian's chromium is not at /usr/bin/chromium; install it with "
    "`apt-get install -y --no-install-recommends chromium`"
)
_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "host", "content-length",
})


def require_chromium() -> None:
    """Skip without chromium, with the command that installs it; fail instead under CI."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI is set, so the browser tests may not skip: {INSTALL_HINT}")
    pytest.skip(f"browser tests: {INSTALL_HINT}")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A fresh headless chromium (its own profile: no cookies carried between tests)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def screenshot(page: Any, name: str) -> Path:
    """Keep what the page shows at the end of a test, and say where."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"browser screenshot: {path}")
    return path


@dataclasses.dataclass
class Forwarded:
    """One request a Front passed to the gateway, and the status the gateway answered."""

    method: str
    path: str
    headers: Mapping[str, str]
    status: int | None = None
    answer_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def cookie(self, name: str) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == name:
                return value
        return None


class Front:
    """A test origin: the page, the gateway behind a streaming reverse proxy, or both."""

    def __init__(self, *, page: bool, proxy: bool) -> None:
        self.upstream = ""
        self.origin = ""
        self.forwarded: list[Forwarded] = []
        self._streams: set[asyncio.BaseTransport] = set()
        self._open = asyncio.Event()
        self._open.set()
        self._session: aiohttp.ClientSession | None = None
        self.app = web.Application()
        if page:
            self.app.router.add_get("/", self._page)
        if proxy:
            self.app.router.add_route("*", "/api/{tail:.*}", self._forward)
        self.app.cleanup_ctx.append(self._session_ctx)

    async def start(self, aiohttp_server: Callable[..., Awaitable[TestServer]]) -> str:
        server = await aiohttp_server(self.app)
        self.origin = str(server.make_url("")).rstrip("/")
        return self.origin

    def streams(self) -> list[Forwarded]:
        return [f for f in self.forwarded if f.path.endswith("/events")]

    def cut(self) -> int:
        """Drop every connection whose answer is being forwarded; how many were."""
        cut = list(self._streams)
        for transport in cut:
            transport.close()
        return len(cut)

    def hold_streams(self) -> None:
        self._open.clear()

    def release_streams(self) -> None:
        self._open.set()

    async def _session_ctx(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            self._session = session
            yield

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        if request.path.endswith("/events"):
            await self._open.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        forwarded = Forwarded(request.method, request.path_qs, headers)
        self.forwarded.append(forwarded)
        body = await request.read()
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers,
            data=body or None, allow_redirects=False,
        ) as upstream:
            forwarded.status, forwarded.answer_headers = upstream.status, dict(upstream.headers)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            transport = request.transport
            assert transport is not None
            self._streams.add(transport)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                pass  # cut: the browser sees the connection drop mid-answer
            finally:
                self._streams.discard(transport)
        return response
