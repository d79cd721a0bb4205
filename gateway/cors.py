"""Cross-origin access to the client API for the exact origins in `CORS_ALLOWED_ORIGINS`.

`setup_cors(app, routes)` takes the client routes (never the webhook or operations ones).
Every answer of those routes carries `Vary: Origin`, so that no cache hands one origin's
answer to another; an answer to an allowed origin also carries that origin, credentials
allowed, and the exposed header fields. Each of their paths answers the CORS preflight
(`OPTIONS` with `Access-Control-Request-Method`) of an allowed origin with the path's
methods and the request headers the API reads. Anything else, including a preflight from
another origin, is answered as if CORS did not exist: no CORS header, `OPTIONS` is `405`.
Without allowed origins nothing is added at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Final

from aiohttp import hdrs, web

from gateway import keys

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "MAX_AGE_SECONDS", "Cors", "setup_cors"]

# the request header fields the client API reads, beyond the CORS-safelisted ones
ALLOWED_HEADERS: Final = ("Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID")
# the answer header fields a page may read, beyond the CORS-safelisted ones
EXPOSED_HEADERS: Final = (
    "Retry-After",
    "Location",
    "X-Request-ID",
    "Idempotent-Replayed",
    "WWW-Authenticate",
    "RateLimit-Policy",
    "RateLimit",
)
# how long a browser may reuse a preflight's answer (Chromium caps it at 7200 too)
MAX_AGE_SECONDS: Final = 7200


@dataclasses.dataclass(frozen=True, slots=True)
class Cors:
    """The allowed origins, and the methods of each cross-origin path template."""

    origins: frozenset[str]
    methods: dict[str, tuple[str, ...]]

    def allowed(self, request: web.Request) -> str | None:
        """The request's origin when it is allowed, else None."""
        origin = request.headers.get(hdrs.ORIGIN)
        return origin if origin in self.origins else None

    def methods_of(self, request: web.Request) -> tuple[str, ...] | None:
        """The methods of the cross-origin path the request was routed to; None: not one."""
        resource = request.match_info.route.resource
        return None if resource is None else self.methods.get(resource.canonical)


def setup_cors(app: web.Application, routes: Iterable[tuple[str, str]]) -> None:
    """Open the (method, path template) routes to the allowed origins, if there are any."""
    origins = app[keys.SETTINGS].cors_allowed_origins
    if not origins:
        return
    methods: dict[str, tuple[str, ...]] = {}
    for method, path in routes:
        methods[path] = (*methods.get(path, ()), method.upper())
    app[keys.CORS] = Cors(frozenset(origins), methods)
    for path in methods:
        app.router.add_route(hdrs.METH_OPTIONS, path, _preflight)
    app.on_response_prepare.append(_decorate)


def _get_cors(app: web.Application) -> Cors:
    try:
        return app[keys.CORS]
    except KeyError:
        raise RuntimeError("CORS is not set up: call setup_cors(app, routes)") from None


async def _preflight(request: web.Request) -> web.Response:
    cors = _get_cors(request.app)
    methods = cors.methods_of(request)
    assert methods is not None  # this handler serves only the cross-origin paths
    if cors.allowed(request) is None or (
        hdrs.ACCESS_CONTROL_REQUEST_METHOD not in request.headers
    ):
        # not a preflight this gateway answers: what OPTIONS got before CORS existed
        raise web.HTTPMethodNotAllowed(request.method, methods)
    return web.Response(
        status=204,
        headers={
            hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(methods),
            hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ", ".join(ALLOWED_HEADERS),
            hdrs.ACCESS_CONTROL_MAX_AGE: str(MAX_AGE_SECONDS),
        },
    )


async def _decorate(request: web.Request, response: web.StreamResponse) -> None:
    cors = _get_cors(request.app)
    if cors.methods_of(request) is None:
        return
    _vary_origin(response)
    origin = cors.allowed(request)
    if origin is None:
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    if request.method != hdrs.METH_OPTIONS:
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = ", ".join(EXPOSED_HEADERS)


def _vary_origin(response: web.StreamResponse) -> None:
    present = response.headers.get(hdrs.VARY, "")
    if "origin" not in (field.strip().lower() for field in present.split(",")):
        response.headers[hdrs.VARY] = f"{present}, Origin" if present else "Origin"
