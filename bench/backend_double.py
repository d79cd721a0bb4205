"""A fast generator backend double: every generate call is answered 202 with our job id.

`python -m bench.backend_double PORT`. GET /calls tells how many calls it answered.
"""

from __future__ import annotations

import sys

import msgspec
from aiohttp import web

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def app() -> web.Application:
    calls = {"count": 0}

    async def generate(request: web.Request) -> web.Response:
        body = _decode(await request.read())
        calls["count"] += 1
        return web.Response(status=202, body=_encode({"job_id": body["job_id"],
                                                      "status": "queued"}),
                            content_type="application/json")

    async def count(request: web.Request) -> web.Response:
        return web.Response(body=_encode(calls), content_type="application/json")

    application = web.Application()
    application.router.add_post("/api/images/generate", generate)
    application.router.add_post("/api/videos/generate", generate)
    application.router.add_get("/calls", count)
    return application


def main() -> None:
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    import asyncio

    loop = loop_factory() if loop_factory else asyncio.new_event_loop()
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]), print=None,
                access_log=None, loop=loop)


if __name__ == "__main__":
    main()
