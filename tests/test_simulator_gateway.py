"""The simulated backend in each mode against the real gateway: every behaviour absorbed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.settings import Secret, Settings
from gateway.simulator import SimulatedBackend, SimulatorConfig, parse_mode
from gateway.store import Database
from tests.backend import eventually
from tests.conftest import WEBHOOK_SECRET
from tests.tokens import hs256_token

Server = Callable[..., Awaitable[TestServer]]
Client = Callable[..., Awaitable[TestClient[Any, Any]]]


async def gateway_and_backend(
    aiohttp_server: Server,
    aiohttp_client: Client,
    make_settings: Callable[..., Settings],
    mode: str,
    legacy: bool = False,
) -> tuple[TestClient[Any, Any], SimulatedBackend]:
    backend = SimulatedBackend(SimulatorConfig(webhook_base="http://unset"))
    backend_server = await aiohttp_server(backend.app())
    backend.public_url = str(backend_server.make_url("")).rstrip("/")
    settings = make_settings(
        backend_url=backend.public_url,
        delivery_retry_schedule=(0.05, 0.1, 0.2),
        legacy_webhook_secret=Secret("legacy-secret") if legacy else None,
        webhook_secrets=() if legacy else (Secret(WEBHOOK_SECRET),),
    )
    client = await aiohttp_client(create_app(settings))
    backend.config = SimulatorConfig(
        webhook_base=str(client.make_url("")).rstrip("/"),
        webhook_secret=None if legacy else WEBHOOK_SECRET,
        legacy_secret="legacy-secret" if legacy else None,
        mix=(parse_mode(mode),),
        step_delay=0.02,
    )
    return client, backend


async def run_one(
    client: TestClient[Any, Any], backend: SimulatedBackend, kind: str = "images"
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {hs256_token('user_a')}"}
    resp = await client.post(f"/api/{kind}/generate", json={"prompt": "a fox"}, headers=headers)
    assert resp.status == 202
    job_id = (await resp.json())["job_id"]
    for _ in range(200):
        await asyncio.sleep(0.05)
        if backend.jobs and not backend.busy:
            break
    await backend.idle()
    resp = await client.get(f"/api/{kind}/{job_id}/result", headers=headers)
    result: dict[str, Any] = await resp.json()
    result["job_id"] = job_id
    return result


EXPECTED = {
    "honest": "COMPLETED",
    "own-uuid": "COMPLETED",
    "lost-answer": "COMPLETED",
    "no-hints": "COMPLETED",
    "duplicates": "COMPLETED",
    "out-of-order": "COMPLETED",
    "fail": "FAILED",
    "slow": "COMPLETED",
}


@pytest.mark.parametrize("mode", list(EXPECTED))
async def test_each_mode_ends_where_it_belongs(
    mode: str,
    aiohttp_server: Server,
    aiohttp_client: Client,
    make_settings: Callable[..., Settings],
    db: Database,
) -> None:
    client, backend = await gateway_and_backend(aiohttp_server, aiohttp_client, make_settings,
                                                mode)
    result = await run_one(client, backend)
    assert result["status"] == EXPECTED[mode]
    job_id = result["job_id"]
    files = await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_id)
    notes = await db.fetch("SELECT type FROM notifications WHERE job_id = $1", job_id)
    if EXPECTED[mode] == "COMPLETED":
        assert files == 1
        assert [n["type"] for n in notes] == ["IMAGE_COMPLETED"]
        assert len(result["images"]) == 1
    else:
        assert files == 0
        assert [n["type"] for n in notes] == ["IMAGE_FAILED"]
    assert await db.fetchval("SELECT count(*) FROM orphans WHERE state = 'unresolved'") == 0
    sent = backend.sent
    assert all(s.http_status is not None and s.http_status < 300 for s in sent)
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == len(
        {s.webhook_id for s in sent})
    if mode == "own-uuid":
        alias = await db.fetchval("SELECT backend_job_id FROM job_aliases WHERE job_id = $1",
                                  job_id)
        assert alias is not None
        assert alias != job_id
    if mode == "duplicates":
        assert sum(s.outcome == "duplicate" for s in sent) == 2 * len(
            {s.webhook_id for s in sent})


async def test_legacy_header_mode_is_accepted_when_enabled(
    aiohttp_server: Server,
    aiohttp_client: Client,
    make_settings: Callable[..., Settings],
) -> None:
    client, backend = await gateway_and_backend(aiohttp_server, aiohttp_client, make_settings,
                                                "honest", legacy=True)
    result = await run_one(client, backend)
    assert result["status"] == "COMPLETED"


async def test_a_lost_own_id_leaves_orphans_for_the_reconciler(
    aiohttp_server: Server,
    aiohttp_client: Client,
    make_settings: Callable[..., Settings],
    db: Database,
) -> None:
    client, backend = await gateway_and_backend(aiohttp_server, aiohttp_client, make_settings,
                                                "own-uuid+lost-answer")
    result = await run_one(client, backend, kind="videos")

    # the lost answer is retried (the backend answers the same own id again) while the
    # backend's webhooks arrive under that id: wait for the retry's outcome, not a race
    async def delivered() -> bool:
        row = await db.fetchrow("SELECT delivered_at FROM outbox WHERE job_id = $1",
                                result["job_id"])
        return row is not None and row["delivered_at"] is not None

    await eventually(delivered)
    job = await db.fetchrow("SELECT status FROM jobs WHERE id = $1", result["job_id"])
    assert job is not None
    assert job["status"] == "QUEUED"
    (backend_id,) = backend.jobs
    orphan = await db.fetchrow("SELECT user_id, prompt, state, event_count FROM orphans "
                               "WHERE backend_job_id = $1", backend_id)
    assert orphan is not None
    assert (orphan["user_id"], orphan["prompt"], orphan["state"], orphan["event_count"]) == (
        "user_a", "a fox", "unresolved", 4)


def test_every_simulator_mode_is_covered() -> None:
    from gateway.simulator import MODES

    assert set(EXPECTED) == set(MODES)
