"""Who may use the review console: an authenticated caller listed in `REVIEW_OPERATORS`.

Reads take the bearer header or, on `GET`, the session cookie (as the client API does).
Actions need the header, or the cookie together with a CSRF token derived from that very
cookie: a page on another site can make a browser send the cookie, never read it, so it
cannot compute the token.
"""

from __future__ import annotations

import hashlib
import hmac

import structlog
from aiohttp import web

from gateway import keys
from gateway.auth import Principal, authenticate, get_auth
from gateway.auth.verifier import InvalidToken
from gateway.errors import Forbidden, Unauthorized

log = structlog.get_logger(__name__)

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
NOT_AN_OPERATOR = "Only review operators (REVIEW_OPERATORS) may use the review console."
FORGED = "The request did not come from the review console (CSRF token or origin)."


def csrf_token(session_token: str) -> str:
    """The token the console's forms carry, bound to the session cookie's value."""
    return hashlib.sha256(b"sorami-review-csrf\x00" + session_token.encode()).hexdigest()


def _allowed(request: web.Request, principal: Principal) -> Principal:
    if principal.user_id not in request.config_dict[keys.SETTINGS].review_operators:
        log.info("review_forbidden", user_id=principal.user_id, path=request.path)
        raise Forbidden(NOT_AN_OPERATOR)
    return principal


async def operator(request: web.Request) -> Principal:
    """The operator reading: 401 without a valid token, 403 for anyone not listed."""
    return _allowed(request, await authenticate(request))


def session_token(request: web.Request) -> str | None:
    """The session cookie's token, when the request has no Authorization header."""
    if "Authorization" in request.headers:
        return None
    name = request.config_dict[keys.SETTINGS].auth_session_cookie
    return request.cookies.get(name, "").strip() or None if name else None


async def acting_operator(request: web.Request, submitted: str | None) -> Principal:
    """The operator of an action (a POST): the bearer header, or the session cookie with
    the CSRF token `submitted` and, when the browser names one, this origin."""
    token = session_token(request)
    if token is None:
        return _allowed(request, await authenticate(request))
    origin = request.headers.get("Origin")
    own = f"{request.scheme}://{request.host}"
    if (origin is not None and origin != own) or not submitted or not hmac.compare_digest(
        submitted, csrf_token(token)
    ):
        log.info("review_forgery_refused", path=request.path, origin=origin)
        raise Forbidden(FORGED)
    try:
        principal = await get_auth(request.app).verifier.verify(token)
    except InvalidToken as exc:
        log.info("auth_rejected", reason=exc.reason, source="cookie", path=request.path)
        raise Unauthorized("A valid bearer token is required.", scheme="Bearer") from None
    return _allowed(request, principal)
