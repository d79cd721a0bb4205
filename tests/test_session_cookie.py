"""The session cookie (Clerk's `__session`): GET routes only, verified exactly like a bearer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.jobs.state import Status
from gateway.settings import Settings
from gateway.store import Database
from tests.factories import insert_job, insert_notification
from tests.test_auth import JWKSEndpoint, assert_rejected, serve_jwks
from tests.test_sse import next_event, read_block
from tests.tokens import AUDIENCE, ISSUER, PARTY, claims, ec_key, hs256_token, rsa_key, user

Client = TestClient[Any, Any]


def cookie(token: str, name: str = "__session") -> dict[str, str]:
    return {"Cookie": f"{name}={token}"}


def session(sub: str = "user_a", **extra: Any) -> dict[str, str]:
    return cookie(hs256_token(sub, **extra))


async def count(db: Database, table: str) -> int:
    value: int = await db.fetchval(f"SELECT count(*) FROM {table}")
    return value


async def test_the_cookie_authenticates_every_get_route(client: Client, db: Database) -> None:
    job_id = await insert_job(db)
    await insert_notification(db, job_id=job_id)
    for path in (f"/api/images/{job_id}/status", f"/api/images/{job_id}/result",
                 "/api/images/user", "/api/videos/user", "/api/notifications"):
        resp = await client.get(path, headers=session())
        assert resp.status == 200, path
    gallery = await (await client.get("/api/images/user", headers=session())).json()
    assert [job["job_id"] for job in gallery["generations"]] == [job_id]


async def test_the_event_stream_follows_a_job_with_the_cookie_and_ends_with_an_end_event(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.CANCELLED)
    async with client.get(f"/api/jobs/{job_id}/events", headers=session()) as resp:
        assert resp.status == 200
        raw = (await resp.content.read()).decode()
    blocks = [b for b in raw.split("\n\n") if b.strip()]
    assert blocks[0] == "retry: 3000"
    assert blocks[-1].splitlines()[0] == "event: end"  # the page tells the final one apart
    assert '"status":"CANCELLED"' in blocks[-1]


async def test_non_terminal_events_have_no_type(client: Client, db: Database) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    async with client.get(f"/api/jobs/{job_id}/events", headers=session()) as resp:
        assert (await read_block(resp)) is not None  # retry hint
        first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"id: 1\ndata: ")


async def test_a_cookie_on_a_post_is_401_and_changes_nothing(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, status=Status.QUEUED)
    note = await insert_notification(db, job_id=job_id)
    for path, body in (("/api/images/generate", {"prompt": "a fox"}),
                       ("/api/videos/generate", {"prompt": "a fox"}),
                       (f"/api/images/{job_id}/cancel", None),
                       (f"/api/notifications/{note}/read", None)):
        await assert_rejected(await client.post(path, json=body, headers=session()))
    assert await count(db, "jobs") == 1
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "QUEUED"
    assert await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", note) is None


@pytest.mark.parametrize("header", ["Bearer not-a-jwt", "Bearer ", "Basic dXNlcjpwYXNz", ""])
async def test_a_cookie_with_a_bad_header_is_401_the_header_wins(
    client: Client, db: Database, header: str
) -> None:
    job_id = await insert_job(db)
    resp = await client.get(f"/api/images/{job_id}/status",
                            headers={**session(), "Authorization": header})
    await assert_rejected(resp)


async def test_a_good_header_wins_over_the_cookie_of_someone_else(
    client: Client, db: Database
) -> None:
    job_id = await insert_job(db, user_id="user_a")
    resp = await client.get(f"/api/images/{job_id}/status",
                            headers={**user("user_a"), **session("user_b")})
    assert resp.status == 200


async def test_a_cookie_of_another_user_sees_404(client: Client, db: Database) -> None:
    job_id = await insert_job(db, user_id="user_a")
    for path in (f"/api/images/{job_id}/status", f"/api/images/{job_id}/result",
                 f"/api/jobs/{job_id}/events"):
        resp = await client.get(path, headers=session("user_b"))
        assert resp.status == 404, path
    gallery = await (await client.get("/api/images/user", headers=session("user_b"))).json()
    assert gallery["generations"] == []


@pytest.mark.parametrize(
    "token",
    [hs256_token("user_a", ttl=-120), hs256_token("user_a", secret="another-secret-" * 3),
     "not-a-jwt", ""],
    ids=["expired", "foreign-signature", "malformed", "empty"],
)
async def test_a_bad_cookie_is_401(client: Client, db: Database, token: str) -> None:
    job_id = await insert_job(db)
    await assert_rejected(await client.get(f"/api/images/{job_id}/status",
                                           headers=cookie(token)))


async def test_the_cookie_is_only_read_under_its_configured_name(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], db: Database
) -> None:
    job_id = await insert_job(db)
    path = f"/api/images/{job_id}/status"
    renamed: Client = await aiohttp_client(
        create_app(make_settings(auth_session_cookie="sorami_session")))
    assert (await renamed.get(path, headers=cookie(hs256_token(), "sorami_session"))).status == 200
    await assert_rejected(await renamed.get(path, headers=session()))
    off: Client = await aiohttp_client(create_app(make_settings(auth_session_cookie=None)))
    await assert_rejected(await off.get(path, headers=session()))
    assert (await off.get(path, headers=user())).status == 200


async def test_with_authorized_parties_a_cookie_needs_one_of_them_as_azp(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings], db: Database
) -> None:
    job_id = await insert_job(db)
    path = f"/api/images/{job_id}/status"
    client: Client = await aiohttp_client(
        create_app(make_settings(auth_authorized_parties=(PARTY,))))
    assert (await client.get(path, headers=session(azp=PARTY))).status == 200
    await assert_rejected(await client.get(path, headers=session(azp="https://evil.example")))
    await assert_rejected(await client.get(path, headers=session()))  # no azp at all


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Any]) -> JWKSEndpoint:
    return await serve_jwks(aiohttp_server, rsa_key(), ec_key())


async def test_a_clerk_style_cookie_is_verified_against_the_jwks(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings],
    provider: JWKSEndpoint, db: Database,
) -> None:
    client: Client = await aiohttp_client(create_app(make_settings(
        auth_hs256_secret=None, auth_jwks_url=provider.url, auth_issuer=ISSUER,
        auth_audience=AUDIENCE, auth_authorized_parties=(PARTY,),
    )))
    job_id = await insert_job(db)
    path = f"/api/jobs/{job_id}/events"
    async with client.get(path, headers=cookie(rsa_key().sign(claims()))) as resp:
        assert resp.status == 200
        assert (await next_event(resp)) is not None
    for bad in (claims(azp="https://evil.example"), claims(iss="https://other.test"),
                claims(aud="someone-else"), claims(ttl=-120), claims(nbf=2**31 - 1)):
        await assert_rejected(await client.get(path, headers=cookie(ec_key().sign(bad))))
    # an HS256 cookie is refused where the deployment verifies against a JWKS
    await assert_rejected(await client.get(path, headers=session(iss=ISSUER, aud=AUDIENCE,
                                                                 azp=PARTY)))
