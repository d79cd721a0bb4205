from __future__ import annotations

from typing import Any

from gateway.store import Database


async def test_healthz_answers_without_the_database(client: Any) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_readyz_is_200_when_migrations_are_current(client: Any) -> None:
    resp = await client.get("/readyz")
    assert resp.status == 200


async def test_readyz_is_503_when_a_migration_is_missing(client: Any, db: Database) -> None:
    await db.execute("DELETE FROM schema_migrations")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["database"] == "migrations pending"


async def test_unknown_route_is_a_problem_document(client: Any) -> None:
    resp = await client.get("/api/nothing-here")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["status"] == 404
    assert body["title"] == "Not Found"
