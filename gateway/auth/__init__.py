"""Who is calling the client API: a JWT verified once per request.

The token is the `Authorization: Bearer` header's; on `GET` routes without that header, it
is the session cookie's (`AUTH_SESSION_COOKIE`, Clerk's `__session`), so that a browser's
EventSource, which cannot send headers, can follow a job. Routes that change something never
read the cookie: a page from another site can make a browser send it, not the header.
`setup_auth(app)` picks the verifier from the settings: a JWKS (RS256/ES256, e.g. Clerk) with
its own aiohttp ClientSession, or an HS256 secret for development. Either token is verified
the same way. Every failure is the same 401 with `WWW-Authenticate: Bearer`, whatever the
cause; the cause is only logged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Final

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
    "SESSION_COOKIE_METHODS",
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
# the methods whose routes change nothing, and so may be authenticated by the session cookie
SESSION_COOKIE_METHODS: Final = frozenset({"GET", "HEAD"})


class Authenticator:
    """Turns a request's bearer token (or session cookie) into a Principal, or the one 401."""

    def __init__(self, verifier: Verifier, *, session_cookie: str | None = None) -> None:
        self.verifier = verifier
        self.session_cookie = session_cookie

    async def authenticate(self, request: web.Request) -> Principal:
        source, token = self._token(request)
        try:
            if not token:
                raise InvalidToken("missing")
            return await self.verifier.verify(token)
        except InvalidToken as exc:
            log.info("auth_rejected", reason=exc.reason, source=source, path=request.path)
            raise Unauthorized(UNAUTHORIZED_MESSAGE, scheme="Bearer") from None
        except JWKSUnavailable:
            log.warning("auth_keys_unavailable", path=request.path)
            raise ServiceUnavailable(
                "The identity provider's keys cannot be fetched; retry later.", retry_after=30
            ) from None

    def _token(self, request: web.Request) -> tuple[str, str]:
        """(where the token came from, the token or ""); the header wins over the cookie."""
        header = request.headers.get("Authorization")
        if header is None and self.session_cookie and request.method in SESSION_COOKIE_METHODS:
            return "cookie", request.cookies.get(self.session_cookie, "").strip()
        scheme, _, token = (header or "").partition(" ")
        return "header", token.strip() if scheme.lower() == "bearer" else ""


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
                    JWKSVerifier(JWKSCache(session, settings.auth_jwks_url), rules),
                    session_cookie=settings.auth_session_cookie,
                )
                yield
            return
        if settings.auth_hs256_secret is not None:
            verifier: Verifier = HS256Verifier(settings.auth_hs256_secret.reveal(), rules)
        else:
            log.warning("auth_not_configured")
            verifier = RejectAll()
        app[keys.AUTH] = Authenticator(verifier, session_cookie=settings.auth_session_cookie)
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
