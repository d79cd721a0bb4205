"""Real JWTs for tests: HS256 with the test secret, RS256/ES256 keys made here and their JWKS."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import HS256_SECRET

ISSUER = "https://clerk.sorami.test"
AUDIENCE = "sorami-gateway"
PARTY = "https://app.sorami.test"


@dataclasses.dataclass(frozen=True)
class KeyPair:
    kid: str
    algorithm: str
    private_key: Any

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def jwk(self) -> dict[str, Any]:
        to_jwk = RSAAlgorithm.to_jwk if self.algorithm == "RS256" else ECAlgorithm.to_jwk
        data: dict[str, Any] = to_jwk(self.public_key, as_dict=True)
        data.update(kid=self.kid, alg=self.algorithm, use="sig")
        return data

    def public_pem(self) -> bytes:
        pem: bytes = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, payload: dict[str, Any], *, headers: dict[str, Any] | None = None,
             kid: str | None = None) -> str:
        return jwt.encode(
            payload,
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": kid or self.kid, **(headers or {})},
        )


@functools.cache
def _rsa_private(seed: str) -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def _ec_private(seed: str) -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(kid: str = "rsa-1") -> KeyPair:
    """An RS256 key pair (one per kid for the whole session: 2048-bit keys take a moment)."""
    return KeyPair(kid, "RS256", _rsa_private(kid))


def ec_key(kid: str = "ec-1") -> KeyPair:
    return KeyPair(kid, "ES256", _ec_private(kid))


def jwks(*pairs: KeyPair, extra: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return {"keys": [p.jwk() for p in pairs] + list(extra)}


def claims(sub: str = "user_a", *, ttl: int = 300, drop: tuple[str, ...] = (),
           **extra: Any) -> dict[str, Any]:
    """Claims a JWKS deployment with ISSUER, AUDIENCE and PARTY accepts, changed by `extra`."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": sub, "iss": ISSUER, "aud": AUDIENCE, "azp": PARTY,
        "iat": now, "nbf": now, "exp": now + ttl,
    }
    payload.update(extra)
    for name in drop:
        payload.pop(name, None)
    return payload


def hs256_token(sub: str = "user_a", *, secret: str = HS256_SECRET, ttl: int = 300,
                **extra: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + ttl, **extra}
    return jwt.encode(payload, secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], *, hmac_key: bytes | None = None) -> str:
    """A token built by hand: PyJWT refuses to make these (alg none, HMAC with a public key)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def user(sub: str = "user_a", **extra: Any) -> dict[str, str]:
    """Authorization headers of an HS256 token for `sub` (the test settings' auth mode)."""
    return bearer(hs256_token(sub, **extra))
