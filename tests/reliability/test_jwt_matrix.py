"""Hostile and broken bearer tokens against a real `serve` process in JWKS mode, the key set
served by a real aiohttp server that counts its fetches.

- The matrix: every kind of bad token, on every client route, is the one 401 (same body,
  `WWW-Authenticate: Bearer`), nothing is written, and a `jku`/`x5u` URL is never fetched.
- A storm of hundreds of concurrent requests under made-up kids fetches the key set at most
  once per 30 s, while genuine tokens keep working.
- An outage of the identity provider (its server stopped): tokens signed with cached keys
  keep working, including right after a refetch failed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt

from gateway.auth import UNAUTHORIZED_MESSAGE
from gateway.store import Database
from tests.reliability.auth_support import (
    Gateway,
    JWKSServer,
    bearer_operations,
    jwks_server,
    openapi_document,
    row_count,
    serve_gateway,
    snapshot,
)
from tests.tokens import (
    AUDIENCE,
    ISSUER,
    PARTY,
    KeyPair,
    bearer,
    claims,
    ec_key,
    forge,
    rsa_key,
)

REJECTED_BODY = {
    "type": "urn:sorami:problem:unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "detail": UNAUTHORIZED_MESSAGE,
}
REFETCH_SECONDS = 30.0
STORM_SIZE = 500
TIMEOUT = aiohttp.ClientTimeout(total=60)


def jwks_env(provider: JWKSServer) -> dict[str, str]:
    return {
        "AUTH_JWKS_URL": provider.url,
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "AUTH_AUTHORIZED_PARTIES": f"{PARTY},https://admin.sorami.test",
    }


def concrete(path: str) -> str:
    """A route template with an id nobody has (authentication comes before the lookup)."""
    missing = "4242" if path.startswith("/api/notifications/") else str(uuid.uuid4())
    return (path.replace("{id}", missing).replace("{kind}", "image")
            .replace("{backend_job_id}", f"bk-{uuid.uuid4()}"))


BODIES = {
    "/api/images/generate": {"prompt": "a lighthouse in a storm", "num_images": 2},
    "/api/videos/generate": {"prompt": "waves on a black sand beach", "duration_seconds": 5},
}


def bad_tokens(attacker_url: str) -> dict[str, dict[str, str]]:
    """Every way a caller can fail authentication, as the Authorization headers it sends."""
    rsa, ec, attacker = rsa_key(), ec_key(), rsa_key("attacker")
    now = int(time.time())
    valid = rsa.sign(claims())
    head, payload, signature = valid.split(".")
    pem = rsa.public_pem()
    tokens: dict[str, str] = {
        "garbage": "not-a-jwt",
        "two segments": f"{head}.{payload}",
        "alg none": forge({"alg": "none", "typ": "JWT", "kid": rsa.kid}, claims()),
        "alg None": forge({"alg": "None", "typ": "JWT", "kid": rsa.kid}, claims()),
        "alg none, genuine signature kept": forge(
            {"alg": "none", "kid": rsa.kid}, claims()).rsplit(".", 1)[0] + "." + signature,
        "HS256 signed with the RSA public key (PEM)": forge(
            {"alg": "HS256", "typ": "JWT", "kid": rsa.kid}, claims(), hmac_key=pem),
        "HS256 signed with the RSA public key (PEM, stripped)": forge(
            {"alg": "HS256", "typ": "JWT", "kid": rsa.kid}, claims(), hmac_key=pem.strip()),
        "HS256 signed with the EC public key": forge(
            {"alg": "HS256", "typ": "JWT", "kid": ec.kid}, claims(), hmac_key=ec.public_pem()),
        "HS256 signed with the JWK's modulus": forge(
            {"alg": "HS256", "kid": rsa.kid}, claims(), hmac_key=rsa.jwk()["n"].encode()),
        "RS384 by the genuine key": _sign(rsa, claims(), "RS384"),
        "PS256 by the genuine key": _sign(rsa, claims(), "PS256"),
        "wrong iss": rsa.sign(claims(iss="https://evil.example")),
        "missing iss": rsa.sign(claims(drop=("iss",))),
        "wrong azp": rsa.sign(claims(azp="https://other-app.example")),
        "missing azp": rsa.sign(claims(drop=("azp",))),
        "wrong aud": rsa.sign(claims(aud="another-service")),
        "aud list without ours": rsa.sign(claims(aud=["a-service", "b-service"])),
        "missing aud": rsa.sign(claims(drop=("aud",))),
        "missing exp": rsa.sign(claims(drop=("exp",))),
        "expired exp (beyond the 30 s leeway)": rsa.sign(claims(exp=now - 120)),
        "expired exp, ES256": ec.sign(claims(exp=now - 3600)),
        "exp not a number": rsa.sign(claims(exp="tomorrow")),
        "future nbf (beyond the 30 s leeway)": rsa.sign(claims(nbf=now + 300)),
        "missing sub": rsa.sign(claims(drop=("sub",))),
        "blank sub": rsa.sign(claims(sub="   ")),
        "sub too long": rsa.sign(claims(sub="u" * 300)),
        "jku to the attacker's key set, attacker's kid": attacker.sign(
            claims(), headers={"jku": attacker_url}),
        "x5u to the attacker's key set, attacker's kid": attacker.sign(
            claims(), headers={"x5u": attacker_url}),
        "jku and x5u, attacker's key under a genuine kid": attacker.sign(
            claims(), headers={"jku": attacker_url, "x5u": attacker_url}, kid=rsa.kid),
        "embedded jwk of the attacker": attacker.sign(
            claims(), headers={"jwk": attacker.jwk()}),
        "embedded jwk, genuine kid": attacker.sign(
            claims(), headers={"jwk": attacker.jwk()}, kid=rsa.kid),
        "unknown kid": rsa.sign(claims(), kid="not-in-the-set"),
        "no kid": forge({"alg": "RS256", "typ": "JWT"}, claims()),
        "ES256 under the RSA kid": ec.sign(claims(), kid=rsa.kid),
        "RS256 under the EC kid": rsa.sign(claims(), kid=ec.kid),
        "tampered payload": f"{head}.{rsa.sign(claims('user_b')).split('.')[1]}.{signature}",
        "signature stripped": f"{head}.{payload}.",
        "signature of another token": f"{head}.{payload}."
                                      + rsa.sign(claims("user_b")).split(".")[2],
    }
    headers = {name: bearer(token) for name, token in tokens.items()}
    headers.update({
        "no Authorization header": {},
        "Basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
        "Bearer without a token": {"Authorization": "Bearer "},
        "token without a scheme": {"Authorization": valid},
        "Token scheme": {"Authorization": f"Token {valid}"},
    })
    return headers


def _sign(pair: KeyPair, payload: dict[str, Any], algorithm: str) -> str:
    return jwt.encode(payload, pair.private_key, algorithm=algorithm, headers={"kid": pair.kid})


async def call(session: aiohttp.ClientSession, gateway: Gateway, method: str, path: str,
               headers: dict[str, str]) -> tuple[int, str | None, str | None, bytes]:
    body = BODIES.get(path)
    sent = dict(headers)
    if method == "POST" and body is not None:
        sent["Idempotency-Key"] = f"matrix-{uuid.uuid4()}"
    async with session.request(method, gateway.url + concrete(path), headers=sent,
                               json=body) as resp:
        return (resp.status, resp.headers.get("WWW-Authenticate"), resp.content_type,
                await resp.read())


async def test_every_bad_token_on_every_route_is_the_same_401_and_writes_nothing(
    database_url: str, db: Database, figures: Any
) -> None:
    async with (
        jwks_server(rsa_key(), ec_key()) as provider,
        jwks_server(rsa_key("attacker")) as attacker,
        serve_gateway(database_url, **jwks_env(provider)) as gateway,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        routes = bearer_operations(await openapi_document(session, gateway.url))
        assert len(routes) >= 13, routes
        cases = bad_tokens(attacker.url)
        before = await snapshot(db)
        started = time.monotonic()

        async def run(name: str, method: str, path: str) -> tuple[str, str, str, Any]:
            return name, method, path, await call(session, gateway, method, path, cases[name])

        answers = await asyncio.gather(*(run(name, method, path) for name in cases
                                         for method, path in routes))
        elapsed = time.monotonic() - started
        wrong = [(n, m, p, a[0]) for n, m, p, a in answers
                 if (a[0], a[1], a[2]) != (401, "Bearer", "application/problem+json")]
        assert not wrong, wrong[:20]
        bodies = {a[3] for *_, a in answers}
        assert [json.loads(b) for b in bodies] == [REJECTED_BODY]
        after = await snapshot(db)
        changed = [name for name in before if before[name] != after[name]]
        assert not changed  # not a row added, nor a column updated, in any table
        # the token's own key URLs are never followed
        assert attacker.fetches == 0
        # the first verifiable token fetched the set; later unknown kids within 30 s did not
        assert 1 <= provider.fetches <= 1 + int(elapsed // REFETCH_SECONDS)
        rejected_reasons = _reasons(gateway)

        # the same routes do write for a genuine token, so "nothing written" meant something
        for key in (rsa_key(), ec_key()):
            status, *_ = await call(session, gateway, "POST", "/api/images/generate",
                                    bearer(key.sign(claims("user_matrix"))))
            assert status == 202
        assert await db.fetchval("SELECT count(*) FROM jobs WHERE user_id = 'user_matrix'") == 2

    figures["cases"] = len(cases)
    figures["routes"] = len(routes)
    figures["requests"] = len(answers)
    figures["401s"] = sum(1 for *_, a in answers if a[0] == 401)
    figures["distinct bodies"] = len(bodies)
    figures["distinct rejection reasons logged"] = len(rejected_reasons)
    figures["tables changed by rejected requests"] = len(changed)
    figures["JWKS fetches"] = provider.fetches
    figures["attacker key set fetches"] = attacker.fetches
    figures["matrix seconds"] = elapsed


def _reasons(gateway: Gateway) -> set[str]:
    found = set()
    for line in gateway.proc.lines:
        if '"auth_rejected"' in line:
            found.add(json.loads(line)["reason"])
    return found


async def storm(session: aiohttp.ClientSession, gateway: Gateway, label: str,
                size: int = STORM_SIZE) -> tuple[list[int], list[int]]:
    """`size` concurrent requests under made-up kids, a genuine token every tenth request:
    (statuses of the made-up ones, statuses of the genuine ones)."""
    made_up = [rsa_key().sign(claims(), kid=f"{label}-{n}-{uuid.uuid4().hex[:8]}")
               for n in range(size)]
    genuine = [(rsa_key() if n % 2 else ec_key()).sign(claims()) for n in range(size // 10)]

    async def get(token: str) -> int:
        async with session.get(f"{gateway.url}/api/notifications",
                               headers=bearer(token)) as resp:
            await resp.read()
            return resp.status

    interleaved = [get(t) for t in made_up] + [get(t) for t in genuine]
    statuses = await asyncio.gather(*interleaved)
    return list(statuses[:size]), list(statuses[size:])


async def test_unknown_kid_storm_fetches_at_most_once_per_30s_and_an_outage_keeps_cached_keys(
    database_url: str, db: Database, figures: Any
) -> None:
    provider = JWKSServer(rsa_key(), ec_key())
    await provider.start()
    try:
        async with (
            serve_gateway(database_url, **jwks_env(provider)) as gateway,
            aiohttp.ClientSession(timeout=TIMEOUT,
                                  connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            rows_before = await row_count(db)
            # 1. the storm hits a gateway that knows no key yet: one fetch serves all of it
            refused, accepted = await storm(session, gateway, "storm1")
            assert refused == [401] * STORM_SIZE
            assert accepted == [200] * len(accepted)
            storm1_fetches = provider.fetches
            assert storm1_fetches == 1
            first_fetch = provider.fetched_at[0]

            # 2. the identity provider goes down
            await provider.stop()
            during_outage = await _keep_calling(
                session, gateway, until=first_fetch + REFETCH_SECONDS + 0.5)
            assert set(during_outage) == {200}
            assert gateway.logged("jwks_fetch_failed") == 0  # still within the 30 s window

            # 3. a second storm, after the window: exactly one refetch is tried, and fails
            refused2, accepted2 = await storm(session, gateway, "storm2")
            assert refused2 == [401] * STORM_SIZE
            assert accepted2 == [200] * len(accepted2)
            await gateway.proc.wait_log('"event": "jwks_fetch_failed"', timeout=10)
            storm2_attempts = gateway.logged("jwks_fetch_failed") + provider.fetches - 1
            assert storm2_attempts == 1

            # 4. after the failed refetch the cached keys still verify
            after_failure = await _keep_calling(session, gateway, count=100)
            assert set(after_failure) == {200}
            assert await row_count(db) == rows_before
            assert gateway.logged("jwks_fetched") == 1
    finally:
        await provider.stop()

    figures["storm size (made-up kids, per storm)"] = STORM_SIZE
    figures["storms"] = 2
    figures["storm requests 401"] = len(refused) + len(refused2)
    figures["genuine requests during storms 200"] = len(accepted) + len(accepted2)
    figures["JWKS fetches, storm 1 (server up)"] = storm1_fetches
    figures["JWKS fetch attempts, storm 2 (server down, 30 s later)"] = storm2_attempts
    figures["requests during outage"] = len(during_outage) + len(accepted2) + len(after_failure)
    figures["requests during outage that succeeded"] = (
        during_outage.count(200) + accepted2.count(200) + after_failure.count(200))


async def _keep_calling(session: aiohttp.ClientSession, gateway: Gateway, *,
                        until: float | None = None, count: int | None = None) -> list[int]:
    """Genuine RS256 and ES256 requests, 20 at a time, until a monotonic time or a count."""
    statuses: list[int] = []
    keys: list[Callable[[], str]] = [lambda: rsa_key().sign(claims()),
                                      lambda: ec_key().sign(claims())]

    async def get(n: int) -> int:
        async with session.get(f"{gateway.url}/api/notifications",
                               headers=bearer(keys[n % 2]())) as resp:
            await resp.read()
            return resp.status

    while True:
        if until is not None and time.monotonic() >= until:
            break
        if count is not None and len(statuses) >= count:
            break
        statuses += await asyncio.gather(*(get(n) for n in range(20)))
        if until is not None:
            await asyncio.sleep(min(0.5, max(0.0, until - time.monotonic())))
    return statuses
