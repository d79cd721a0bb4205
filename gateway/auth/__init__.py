"""Who is calling the client API: `Authorization: Bearer <JWT>` verified once per request.

`setup_auth(app)` picks the verifier from the settings: a JWKS (RS256/ES256, e.g. Clerk) with
its own aiohttp ClientSession, or an HS256 secret for development. Every failure is the same
401 with `WWW-Authenticate: Bearer`, whatever the cause; the cause is only logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import jwt
import structlog
from aiohttp import web

from gateway import keys
from gateway.auth.jwks import JWKSCache, JWKSUnavailable
from gateway.auth.verifier import (
    ClaimRules,
    HS256Verifier,
    InvalidToken,
    JWKSVerifier,
    Principal,
    RejectAll,
    Verifier,
)
from gateway.errors import ServiceUnavailable, Unauthorized
from gateway.settings import Settings, SettingsError

__all__ = [
    "Authenticator",
    "Principal",
    "authenticate",
    "dev_token",
    "get_auth",
    "rules_from",
    "setup_auth",
]

log = structlog.get_logger(__name__)

# The one answer to every authentication failure, so that none tells a cause apart.
UNAUTHORIZED_MESSAGE = "A valid bearer token is required."


class Authenticator:
    """Turns a request's Authorization header into a Principal, or the one 401."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    async def authenticate(self, request: web.Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        try:
            if scheme.lower() != "bearer" or not token:
                raise InvalidToken("missing")
            return await self.verifier.verify(token)
        except InvalidToken as exc:
            log.info("auth_rejected", reason=exc.reason, path=request.path)
            raise Unauthorized(UNAUTHORIZED_MESSAGE, scheme="Bearer") from None
        except JWKSUnavailable:
            log.warning("auth_keys_unavailable", path=request.path)
            raise ServiceUnavailable(
                "The identity provider's keys cannot be fetched; retry later.", retry_after=30
            ) from None


def rules_from(settings: Settings) -> ClaimRules:
    return ClaimRules(
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        authorized_parties=settings.auth_authorized_parties,
    )


def setup_auth(app: web.Application) -> None:
    """The verifier the settings call for; a JWKS gets its own ClientSession."""

    async def auth_ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[keys.SETTINGS]
        rules = rules_from(settings)
        if settings.auth_jwks_url:
            async with aiohttp.ClientSession(
                headers={"User-Agent": "sorami-gateway"}, raise_for_status=False
            ) as session:
                app[keys.AUTH] = Authenticator(
                    JWKSVerifier(JWKSCache(session, settings.auth_jwks_url), rules)
                )
                yield
            return
        if settings.auth_hs256_secret is not None:
            verifier: Verifier = HS256Verifier(settings.auth_hs256_secret.reveal(), rules)
        else:
            log.warning("auth_not_configured")
            verifier = RejectAll()
        app[keys.AUTH] = Authenticator(verifier)
        yield

    app.cleanup_ctx.append(auth_ctx)


def get_auth(app: web.Application) -> Authenticator:
    try:
        return app[keys.AUTH]
    except KeyError:
        raise RuntimeError("authentication is not set up: call setup_auth(app)") from None


async def authenticate(request: web.Request) -> Principal:
    """The caller of this request, or the one 401."""
    return await get_auth(request.app).authenticate(request)


def dev_token(
    settings: Settings, user_id: str, *, org_id: str | None = None, ttl: int = 3600
) -> str:
    """An HS256 token that this gateway's HS256 verifier accepts with these settings."""
    if settings.auth_jwks_url:
        raise SettingsError(
            "AUTH_JWKS_URL", "is set: development tokens need HS256 mode (AUTH_HS256_SECRET)"
        )
    if settings.auth_hs256_secret is None:
        raise SettingsError("AUTH_HS256_SECRET", "is required to make development tokens")
    if ttl < 1:
        raise SettingsError("--ttl", "must be at least 1 second")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "nbf": now, "exp": now + ttl}
    if org_id:
        claims["org_id"] = org_id
    if settings.auth_issuer:
        claims["iss"] = settings.auth_issuer
    if settings.auth_audience:
        claims["aud"] = settings.auth_audience
    if settings.auth_authorized_parties:
        claims["azp"] = settings.auth_authorized_parties[0]
    return jwt.encode(claims, settings.auth_hs256_secret.reveal(), algorithm="HS256")
