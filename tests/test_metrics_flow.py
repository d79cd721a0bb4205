"""One scrape after real traffic: the counters operators alert on move by exactly what
happened (one applied, one duplicate, one orphan, one bad signature, one delivery retry)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.settings import Settings
from tests.backend import ACCEPT, Call, Reply, ScriptedBackend, eventually, status
from tests.conftest import WEBHOOK_KEY
from tests.metrics_helpers import Scrape
from tests.signing import signed
from tests.tokens import bearer, hs256_token

Client = Callable[..., Awaitable[TestClient[Any, Any]]]
Server = Callable[..., Awaitable[TestServer]]
ROUTE = "/api/webhooks/image-completion"


async def scrape(client: TestClient[Any, Any]) -> Scrape:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return Scrape(await resp.text())


async def test_counters_move_by_what_happened(
    make_settings: Callable[..., Settings],  # first: the database outlives the app
    aiohttp_client: Client,
    aiohttp_server: Server,
) -> None:
    calls = 0

    def first_call_503(_call: Call) -> Reply:
        # the default reply, set before the job exists: its commit wakes delivery at once
        nonlocal calls
        calls += 1
        return status(503) if calls == 1 else ACCEPT

    backend = ScriptedBackend(first_call_503)
    url = await backend.start(aiohttp_server)
    client = await aiohttp_client(
        create_app(make_settings(backend_url=url, delivery_retry_schedule=(0.05, 0.1)))
    )
    before = await scrape(client)

    # a job whose first call meets a 503, then is accepted
    resp = await client.post("/api/images/generate", json={"prompt": "a fox"},
                             headers=bearer(hs256_token("user_a")))
    assert resp.status == 202
    job_id = (await resp.json())["job_id"]

    async def queued() -> bool:
        r = await client.get(f"/api/images/{job_id}/status",
                             headers=bearer(hs256_token("user_a")))
        return bool((await r.json())["status"] == "QUEUED")

    await eventually(queued)

    # one applied, the same delivery again, an unknown job id, a bad signature
    body, headers = signed({"job_id": job_id, "status": "generating", "progress": 50},
                           WEBHOOK_KEY, "msg_applied")
    for _ in range(2):
        assert (await client.post(ROUTE, data=body, headers=headers)).status == 200
    body, headers = signed({"job_id": "backend-unknown", "status": "generating"},
                           WEBHOOK_KEY, "msg_orphan")
    assert (await client.post(ROUTE, data=body, headers=headers)).status == 202
    forged_key = b"not-the-gateway-webhook-key-0123"
    body, headers = signed({"job_id": job_id, "status": "saving"}, forged_key, "msg_forged")
    assert (await client.post(ROUTE, data=body, headers=headers)).status == 401

    after = await scrape(client)

    def moved(sample: str, **labels: str) -> float:
        return after.get(sample, **labels) - before.get(sample, **labels)

    for outcome, expected in [("applied", 1), ("duplicate", 1), ("orphaned", 1),
                              ("invalid_signature", 1), ("stale", 0)]:
        assert moved("sorami_webhooks_total", kind="image", outcome=outcome) == expected, outcome
    assert moved("sorami_delivery_attempts_total", action="generate", outcome="retry") == 1
    assert moved("sorami_delivery_attempts_total", action="generate", outcome="delivered") == 1
    assert moved("sorami_jobs_created_total", kind="image") == 1
