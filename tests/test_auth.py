"""Bearer JWTs: RS256/ES256 against a JWKS served by a real test server, and HS256."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import routes
from gateway.app import create_app
from gateway.auth import UNAUTHORIZED_MESSAGE
from gateway.auth.jwks import JWKSCache, JWKSUnavailable
from gateway.settings import Settings
from gateway.store import Database
from tests.conftest import HS256_SECRET
from tests.procs import clean_env
from tests.tokens import (
    AUDIENCE,
    ISSUER,
    PARTY,
    KeyPair,
    bearer,
    claims,
    ec_key,
    forge,
    hs256_token,
    jwks,
    rsa_key,
)

PROTECTED = "/api/notifications"
REJECTED_BODY = {
    "type": "urn:sorami:problem:unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "detail": UNAUTHORIZED_MESSAGE,
}


class JWKSEndpoint:
    """A JWKS served by a real aiohttp server, counting the requests it gets."""

    def __init__(self, *pairs: KeyPair) -> None:
        self.document: dict[str, Any] = jwks(*pairs)
        self.status = 200
        self.requests = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status, text="identity provider down")
        return web.json_response(self.document)


async def serve_jwks(aiohttp_server: Callable[..., Any], *pairs: KeyPair) -> JWKSEndpoint:
    endpoint = JWKSEndpoint(*pairs)
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", endpoint.handle)
    server: TestServer = await aiohttp_server(app)
    endpoint.url = str(server.make_url("/.well-known/jwks.json"))
    return endpoint


@pytest.fixture
async def provider(aiohttp_server: Callable[..., Any]) -> JWKSEndpoint:
    return await serve_jwks(aiohttp_server, rsa_key(), ec_key())


@pytest.fixture
async def jwks_client(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    provider: JWKSEndpoint,
) -> TestClient[web.Request, web.Application]:
    settings = make_settings(
        auth_hs256_secret=None,
        auth_jwks_url=provider.url,
        auth_issuer=ISSUER,
        auth_audience=AUDIENCE,
        auth_authorized_parties=(PARTY,),
    )
    client: TestClient[web.Request, web.Application] = await aiohttp_client(create_app(settings))
    return client


async def assert_rejected(resp: aiohttp.ClientResponse) -> None:
    """The one answer to every authentication failure."""
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert resp.content_type == "application/problem+json"
    assert await resp.json() == REJECTED_BODY


# --- JWKS mode ----------------------------------------------------------------------------


async def test_valid_rs256_token_is_accepted(jwks_client: Any) -> None:
    resp = await jwks_client.get(PROTECTED, headers=bearer(rsa_key().sign(claims())))
    assert resp.status == 200


async def test_valid_es256_token_is_accepted(jwks_client: Any) -> None:
    resp = await jwks_client.get(PROTECTED, headers=bearer(ec_key().sign(claims())))
    assert resp.status == 200


async def test_expired_token_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(exp=int(time.time()) - 120))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_token_expired_within_the_leeway_is_accepted(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(exp=int(time.time()) - 5))
    assert (await jwks_client.get(PROTECTED, headers=bearer(token))).status == 200


async def test_wrong_issuer_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(iss="https://evil.example"))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_missing_issuer_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(drop=("iss",)))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_wrong_azp_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(azp="https://other-app.example"))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_missing_azp_is_401_when_parties_are_configured(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(drop=("azp",)))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_wrong_audience_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(aud="another-service"))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_missing_exp_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(drop=("exp",)))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_missing_sub_is_401(jwks_client: Any) -> None:
    token = rsa_key().sign(claims(drop=("sub",)))
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_tampered_payload_is_401(jwks_client: Any) -> None:
    header, _payload, signature = rsa_key().sign(claims("user_a")).split(".")
    other = rsa_key().sign(claims("user_b")).split(".")[1]
    await assert_rejected(
        await jwks_client.get(PROTECTED, headers=bearer(f"{header}.{other}.{signature}"))
    )


async def test_alg_none_is_401(jwks_client: Any) -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims())
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_hs256_signed_with_the_rsa_public_key_is_401(
    jwks_client: Any, provider: JWKSEndpoint
) -> None:
    public = rsa_key()
    for hmac_key in (public.public_pem(), public.public_pem().strip()):
        token = forge({"alg": "HS256", "typ": "JWT", "kid": public.kid}, claims(),
                      hmac_key=hmac_key)
        await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_symmetric_key_published_in_the_jwks_is_never_used(
    aiohttp_client: Callable[..., Any],
    aiohttp_server: Callable[..., Any],
    make_settings: Callable[..., Settings],
) -> None:
    secret = b"a-symmetric-key-that-a-jwks-must-never-carry"
    endpoint = await serve_jwks(aiohttp_server, rsa_key())
    endpoint.document["keys"].append({
        "kty": "oct", "kid": "oct-1", "alg": "HS256",
        "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode(),
    })
    client = await aiohttp_client(create_app(make_settings(
        auth_hs256_secret=None, auth_jwks_url=endpoint.url, auth_issuer=ISSUER)))
    token = forge({"alg": "HS256", "typ": "JWT", "kid": "oct-1"}, claims(), hmac_key=secret)
    await assert_rejected(await client.get(PROTECTED, headers=bearer(token)))
    assert (await client.get(PROTECTED, headers=bearer(rsa_key().sign(claims())))).status == 200


async def test_jku_and_x5u_headers_are_ignored(
    jwks_client: Any, aiohttp_server: Callable[..., Any]
) -> None:
    attacker_key = rsa_key("attacker")
    attacker = await serve_jwks(aiohttp_server, attacker_key)
    pointers = {"jku": attacker.url, "x5u": attacker.url}
    forged = attacker_key.sign(claims(), headers=pointers)
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(forged)))
    genuine = rsa_key().sign(claims(), headers=pointers)
    assert (await jwks_client.get(PROTECTED, headers=bearer(genuine))).status == 200
    assert attacker.requests == 0


async def test_embedded_jwk_header_is_ignored(jwks_client: Any) -> None:
    attacker_key = rsa_key("attacker")
    token = attacker_key.sign(claims(), headers={"jwk": attacker_key.jwk()})
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))
    # the attacker's key claiming a known kid fails the signature check
    spoof = attacker_key.sign(claims(), headers={"jwk": attacker_key.jwk()}, kid="rsa-1")
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(spoof)))


async def test_es256_token_under_an_rsa_kid_is_401(jwks_client: Any) -> None:
    token = ec_key().sign(claims(), kid="rsa-1")
    await assert_rejected(await jwks_client.get(PROTECTED, headers=bearer(token)))


async def test_unknown_kid_storm_fetches_the_jwks_at_most_once_per_30s(
    jwks_client: Any, provider: JWKSEndpoint
) -> None:
    assert (await jwks_client.get(PROTECTED, headers=bearer(rsa_key().sign(claims())))).status \
        == 200
    assert provider.requests == 1
    storm = [rsa_key().sign(claims(), kid=f"made-up-{n}") for n in range(30)]
    answers = await asyncio.gather(*(jwks_client.get(PROTECTED, headers=bearer(t))
                                     for t in storm))
    for resp in answers:
        await assert_rejected(resp)
    assert provider.requests == 1


async def test_first_requests_at_once_fetch_the_jwks_once(
    jwks_client: Any, provider: JWKSEndpoint
) -> None:
    tokens = [rsa_key().sign(claims()), ec_key().sign(claims())] * 5
    answers = await asyncio.gather(*(jwks_client.get(PROTECTED, headers=bearer(t))
                                     for t in tokens))
    assert [r.status for r in answers] == [200] * 10
    assert provider.requests == 1


async def test_jwks_outage_keeps_cached_keys_working(
    jwks_client: Any, provider: JWKSEndpoint
) -> None:
    assert (await jwks_client.get(PROTECTED, headers=bearer(rsa_key().sign(claims())))).status \
        == 200
    provider.status = 503
    for key in (rsa_key(), ec_key(), rsa_key()):
        assert (await jwks_client.get(PROTECTED, headers=bearer(key.sign(claims())))).status \
            == 200


async def test_jwks_unreachable_before_any_key_is_known_is_503(
    jwks_client: Any, provider: JWKSEndpoint
) -> None:
    provider.status = 500
    resp = await jwks_client.get(PROTECTED, headers=bearer(rsa_key().sign(claims())))
    assert resp.status == 503
    assert "Retry-After" in resp.headers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_new_kid_after_the_refetch_window_is_fetched(
    provider: JWKSEndpoint, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    cache = JWKSCache(session, provider.url, clock=clock)
    assert await cache.get("rsa-1") is not None
    provider.document = jwks(rsa_key(), ec_key(), rsa_key("rsa-2"))  # the provider rotates
    clock.now += 10
    assert await cache.get("rsa-2") is None
    clock.now += 21
    key = await cache.get("rsa-2")
    assert key is not None
    assert key.key_id == "rsa-2"
    assert provider.requests == 2


async def test_failed_refetch_keeps_the_cached_keys(
    provider: JWKSEndpoint, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    cache = JWKSCache(session, provider.url, clock=clock)
    assert await cache.get("rsa-1") is not None
    provider.status = 502
    clock.now += 31
    assert await cache.get("unknown") is None
    assert provider.requests == 2
    assert await cache.get("rsa-1") is not None
    assert cache.kids == {"rsa-1", "ec-1"}


async def test_stale_keys_are_refreshed_and_kept_when_the_refresh_fails(
    provider: JWKSEndpoint, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    cache = JWKSCache(session, provider.url, clock=clock, max_age_seconds=600)
    assert await cache.get("rsa-1") is not None
    provider.status = 500
    clock.now += 601
    assert await cache.get("rsa-1") is not None
    assert provider.requests == 2
    provider.status = 200
    provider.document = jwks(ec_key())  # rsa-1 withdrawn
    clock.now += 31
    assert await cache.get("rsa-1") is None
    assert provider.requests == 3


async def test_unreachable_jwks_server_keeps_the_cached_keys(
    aiohttp_server: Callable[..., Any], session: aiohttp.ClientSession
) -> None:
    endpoint = JWKSEndpoint(rsa_key())
    app = web.Application()
    app.router.add_get("/jwks", endpoint.handle)
    server: TestServer = await aiohttp_server(app)
    clock = Clock()
    cache = JWKSCache(session, str(server.make_url("/jwks")), clock=clock, timeout_seconds=2)
    assert await cache.get("rsa-1") is not None
    await server.close()
    clock.now += 31
    assert await cache.get("rsa-2") is None
    assert await cache.get("rsa-1") is not None


# --- any mode: the header itself -----------------------------------------------------------


async def test_missing_authorization_is_401(client: Any) -> None:
    await assert_rejected(await client.get(PROTECTED))


async def test_basic_scheme_is_401(client: Any) -> None:
    await assert_rejected(
        await client.get(PROTECTED, headers={"Authorization": "Basic dXNlcjpwYXNz"}))


async def test_garbage_token_is_401(client: Any) -> None:
    await assert_rejected(await client.get(PROTECTED, headers=bearer("not.a.jwt")))


# --- HS256 mode (the test settings) --------------------------------------------------------


async def test_hs256_token_is_accepted_in_hs256_mode(client: Any) -> None:
    assert (await client.get(PROTECTED, headers=bearer(hs256_token()))).status == 200


async def test_hs256_token_with_another_secret_is_401(client: Any) -> None:
    token = hs256_token(secret="another-secret-that-is-long-enough-too!")
    await assert_rejected(await client.get(PROTECTED, headers=bearer(token)))


async def test_rs256_token_in_hs256_mode_is_401(client: Any) -> None:
    token = rsa_key().sign(claims())
    await assert_rejected(await client.get(PROTECTED, headers=bearer(token)))


async def test_expired_hs256_token_is_401(client: Any) -> None:
    await assert_rejected(await client.get(PROTECTED, headers=bearer(hs256_token(ttl=-120))))


async def test_alg_none_in_hs256_mode_is_401(client: Any) -> None:
    token = forge({"alg": "none", "typ": "JWT"}, {"sub": "user_a",
                                                  "exp": int(time.time()) + 60})
    await assert_rejected(await client.get(PROTECTED, headers=bearer(token)))


async def test_hs256_issuer_is_checked_when_configured(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth_issuer=ISSUER)))
    await assert_rejected(await client.get(PROTECTED, headers=bearer(hs256_token())))
    resp = await client.get(PROTECTED, headers=bearer(hs256_token(iss=ISSUER)))
    assert resp.status == 200


# --- `sorami-gateway token` ------------------------------------------------------------------


def run_token(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "token", *args],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_token_authenticates_and_carries_the_org(
    aiohttp_client: Callable[..., Any],
    make_settings: Callable[..., Settings],
    database_url: str,
    db: Database,
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "AUTH_HS256_SECRET": HS256_SECRET,
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "AUTH_AUTHORIZED_PARTIES": f"{PARTY},https://other.example",
    }
    result = await asyncio.to_thread(run_token, "--user", "user_cli", "--org", "org_7",
                                     "--ttl", "120", **env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    settings = Settings.from_env({**env, "SORAMI_EMBEDDED": "on"})
    client = await aiohttp_client(create_app(make_settings(
        auth_issuer=settings.auth_issuer,
        auth_audience=settings.auth_audience,
        auth_authorized_parties=settings.auth_authorized_parties,
    )))
    resp = await client.post("/api/images/generate", json={"prompt": "a lighthouse"},
                             headers=bearer(token))
    assert resp.status == 202, await resp.text()
    row = await db.fetchrow("SELECT user_id, org_id FROM jobs WHERE id = $1",
                            (await resp.json())["job_id"])
    assert row is not None
    assert (row["user_id"], row["org_id"]) == ("user_cli", "org_7")


def test_cli_token_refuses_jwks_mode(database_url: str) -> None:
    result = run_token("--user", "u", DATABASE_URL=database_url,
                       AUTH_JWKS_URL="https://clerk.example/jwks", AUTH_ISSUER=ISSUER)
    assert result.returncode == 2
    assert result.stderr.startswith("sorami-gateway: error: AUTH_JWKS_URL:")
    assert result.stdout == ""


def test_cli_token_needs_a_secret_without_the_embedded_default(database_url: str) -> None:
    result = run_token("--user", "u", DATABASE_URL=database_url)
    assert result.returncode == 2
    assert result.stderr.startswith("sorami-gateway: error: AUTH_HS256_SECRET:")


async def test_every_client_route_requires_a_token(client: Any) -> None:
    for route in routes():
        path = route.operation.path.replace("{id}", "1")
        resp = await client.request(route.operation.method, path, json={"prompt": "p"})
        assert resp.status == 401, (route.operation.method, path)
        await assert_rejected(resp)


def padding_keys(count: int) -> tuple[dict[str, Any], ...]:
    """Keys the cache must skip (encryption use), to make a key set large."""
    return tuple({"kty": "RSA", "use": "enc", "kid": f"enc-{n}", "n": "A" * 700, "e": "AQAB"}
                 for n in range(count))


async def test_large_key_set_is_read_whole(
    provider: JWKSEndpoint, session: aiohttp.ClientSession
) -> None:
    provider.document = jwks(ec_key(), extra=(*padding_keys(300), rsa_key().jwk()))
    cache = JWKSCache(session, provider.url)
    assert await cache.get("rsa-1") is not None
    assert cache.kids == {"ec-1", "rsa-1"}


async def test_oversized_key_set_is_refused(
    provider: JWKSEndpoint, session: aiohttp.ClientSession
) -> None:
    provider.document = jwks(rsa_key(), extra=padding_keys(1000))
    cache = JWKSCache(session, provider.url)
    with pytest.raises(JWKSUnavailable):
        await cache.get("rsa-1")
