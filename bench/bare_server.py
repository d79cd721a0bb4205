"""The least a webhook server can do with the gateway's statement: the reference for ingest.

`python -m bench ingest --bare` runs this in place of `sorami-gateway serve`, to show what
the gateway's own work costs on this machine: the same route, the same decoding and the
same single statement (`store_webhooks.ingest_statement`), on uvloop with an asyncpg pool
of the gateway's default size; and nothing else. No signature check, no metrics, no logs,
no middleware, no deadlines, no order among pool borrowers, no orphans: it is not a server
to run, only a measure.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import msgspec
from aiohttp import web

from gateway.jobs.kinds import Kind
from gateway.jobs.payload import decode
from gateway.settings import Settings
from gateway.store import webhooks as store_webhooks
from gateway.store.database import init_connection

ROUTE = "/api/webhooks/image-completion"


def _outcome(row: Any) -> bytes:
    if row is None:
        raise web.HTTPNotFound()  # an unknown job: not part of this measure
    if row["seen"] or not row["claimed"]:
        outcome = "duplicate"
    else:
        outcome = "applied" if row["applies"] else "stale"
    return msgspec.json.encode({"outcome": outcome})


async def serve(database_url: str, port: int) -> None:
    size = Settings().db_pool_max
    pool = await asyncpg.create_pool(
        database_url, min_size=size, max_size=size, init=init_connection
    )

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        payload = decode(body)
        delivery = store_webhooks.Delivery(
            Kind.IMAGE, "id:" + request.headers["webhook-id"], payload, body
        )
        statement, args, _ = store_webhooks.ingest_statement(delivery)
        async with pool.acquire() as conn:
            row = await conn.fetchrow(statement, *args)
        return web.Response(body=_outcome(row), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(ROUTE, webhook)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await pool.close()


def main() -> None:
    import uvloop

    uvloop.run(serve(os.environ["DATABASE_URL"], int(os.environ["PORT"])))


if __name__ == "__main__":
    main()
