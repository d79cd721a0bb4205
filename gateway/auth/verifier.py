"""Bearer token verification: RS256/ES256 against a JWKS, or HS256 for development.

One algorithm family per deployment: a JWKS verifier accepts only the asymmetric algorithms
its keys declare, so an HS256 token "signed" with a published RSA key is refused before any
key is touched; the HS256 verifier accepts only HS256. The `jku`, `x5u` and `jwk` headers are
never read: keys come from the configured JWKS only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final, Protocol

import jwt

from gateway.auth.jwks import ALGORITHMS, JWKSCache

LEEWAY_SECONDS: Final = 30
MAX_SUBJECT_LENGTH: Final = 256


class InvalidToken(Exception):
    """The token is not acceptable; `reason` is for logs only, never for the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the token's `sub`, and its `org_id` claim when there is one."""

    user_id: str
    org_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ClaimRules:
    issuer: str | None = None
    audience: str | None = None
    authorized_parties: tuple[str, ...] = ()
    leeway: float = LEEWAY_SECONDS

    def decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        """Verify signature and registered claims with PyJWT, then the gateway's own."""
        required = ["exp", "sub"]
        if self.issuer is not None:
            required.append("iss")
        if self.audience is not None:
            required.append("aud")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": required, "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(type(exc).__name__) from None
        if self.authorized_parties and claims.get("azp") not in self.authorized_parties:
            raise InvalidToken("azp")
        return claims

    def principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > MAX_SUBJECT_LENGTH:
            raise InvalidToken("sub")
        org = claims.get("org_id")
        org_id = org if isinstance(org, str) and 0 < len(org) <= MAX_SUBJECT_LENGTH else None
        return Principal(user_id=sub, org_id=org_id)


class Verifier(Protocol):
    async def verify(self, token: str) -> Principal: ...


def _header(token: str) -> dict[str, Any]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidToken("malformed") from None
    return header


class HS256Verifier:
    """Development tokens signed with AUTH_HS256_SECRET (see `sorami-gateway token`)."""

    def __init__(self, secret: str, rules: ClaimRules) -> None:
        self._secret = secret
        self._rules = rules

    async def verify(self, token: str) -> Principal:
        if _header(token).get("alg") != "HS256":
            raise InvalidToken("algorithm")
        return self._rules.principal(self._rules.decode(token, self._secret, "HS256"))


class JWKSVerifier:
    """RS256/ES256 tokens whose `kid` names a key of the configured JWKS."""

    def __init__(self, keys: JWKSCache, rules: ClaimRules) -> None:
        self._keys = keys
        self._rules = rules

    async def verify(self, token: str) -> Principal:
        header = _header(token)
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALGORITHMS:
            raise InvalidToken("algorithm")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("kid")
        key = await self._keys.get(kid)
        if key is None:
            raise InvalidToken("unknown_kid")
        if key.algorithm_name != algorithm:
            raise InvalidToken("algorithm_mismatch")
        return self._rules.principal(self._rules.decode(token, key.key, algorithm))


class RejectAll:
    """No authentication configured: every token is refused."""

    async def verify(self, token: str) -> Principal:
        raise InvalidToken("not_configured")
