"""Settings read from the environment once, at start, and validated as a whole."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.jobs.limits import Limits
from gateway.store.dsn import DatabaseURL, InvalidDatabaseURL

DEFAULT_RETRY_SCHEDULE: Final = (5.0, 30.0, 120.0, 600.0, 1800.0, 7200.0)

_Check = Callable[[str], "str | None"]


class SettingsError(GatewayError):
    """A setting is malformed."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Secret:
    """A value that never shows itself in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[type[Secret], tuple[str]]:
        return (Secret, (self._value,))


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    database_url: Secret | None = None
    data_dir: Path = Path(".sorami")
    host: str = "127.0.0.1"
    port: int = 8080
    webhook_secrets: tuple[Secret, ...] = ()
    webhook_tolerance_seconds: int = 300
    webhook_max_body_bytes: int = 1024 * 1024
    legacy_webhook_secret: Secret | None = None
    backend_url: str | None = None
    backend_api_key: Secret | None = None
    backend_timeout_seconds: float = 15.0
    delivery_retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_authorized_parties: tuple[str, ...] = ()
    auth_hs256_secret: Secret | None = None
    request_max_body_bytes: int = 16 * 1024 * 1024
    sse_heartbeat_seconds: float = 15.0
    # slow clients: a request head, and then its body, must arrive within these
    http_header_timeout_seconds: float = 30.0
    http_body_timeout_seconds: float = 60.0
    db_pool_min: int = 2
    db_pool_max: int = 10
    log_level: str = "info"
    # off in the container image, where DATABASE_URL is required
    embedded_allowed: bool = True
    # the reconciler: active jobs unchanged this long time out; dedupe records kept this long
    job_timeout_image_seconds: int = 15 * 60
    job_timeout_video_seconds: int = 60 * 60
    dedupe_retention_seconds: int = 7 * 86400
    # the reconciler's audit rows that no orphan needs any more are kept this long
    reconcile_audit_retention_seconds: int = 30 * 86400
    # a request head over these is refused (414 / 431) before any handler runs
    http_max_request_line_bytes: int = 8190
    http_max_header_field_bytes: int = 8190
    http_max_header_bytes: int = 32768
    # browsers: the exact origins allowed to call the client API, and the cookie that
    # authenticates GET routes (Clerk's `__session`; None: off)
    cors_allowed_origins: tuple[str, ...] = ()
    auth_session_cookie: str | None = "__session"
    # the review console: the JWT subjects allowed to see and decide orphans
    review_operators: tuple[str, ...] = ()
    # per-user limits on creating jobs (0: off); overrides per user live in the database
    user_max_active_image_jobs: int = 10
    user_max_active_video_jobs: int = 3
    user_max_image_jobs_per_hour: int = 200
    user_max_video_jobs_per_hour: int = 20
    # jobs of a kind handed to the backend and not yet terminal (0: no limit); the rest wait
    backend_max_in_flight_image_jobs: int = 0
    backend_max_in_flight_video_jobs: int = 0
    # group commit: webhook deliveries and creates queued while a transaction is in flight go
    # together in the next, up to these many (0 or 1: off, one transaction each), with up to
    # batch_in_flight transactions of each stage at once per process
    webhook_batch_max: int = 64
    create_batch_max: int = 64
    batch_in_flight: int = 4

    @property
    def embedded(self) -> bool:
        """True when no DATABASE_URL is given and the embedded PostgreSQL is used."""
        return self.database_url is None

    def user_limits(self, kind: Kind) -> Limits:
        """The per-user limits on creating jobs of `kind` that apply without an override."""
        if kind is Kind.IMAGE:
            return Limits(self.user_max_active_image_jobs, self.user_max_image_jobs_per_hour)
        return Limits(self.user_max_active_video_jobs, self.user_max_video_jobs_per_hour)

    def backend_max_in_flight(self, kind: Kind) -> int:
        """How many jobs of `kind` may be with the backend at once (0: no limit)."""
        if kind is Kind.IMAGE:
            return self.backend_max_in_flight_image_jobs
        return self.backend_max_in_flight_video_jobs

    def webhook_keys(self) -> tuple[bytes, ...]:
        """The raw HMAC keys behind the ``whsec_`` secrets."""
        return tuple(webhook_key(s.reveal()) for s in self.webhook_secrets)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parse every variable; the first malformed one raises SettingsError naming it."""
        e = os.environ if env is None else env
        p = _Parser(e)
        settings = cls(
            database_url=p.secret("DATABASE_URL", check=_check_postgres_url),
            data_dir=Path(p.text("SORAMI_DATA_DIR") or ".sorami"),
            host=p.text("HOST") or "127.0.0.1",
            port=p.integer("PORT", 8080, low=0, high=65535),
            webhook_secrets=p.whsec_list("WEBHOOK_SECRETS"),
            webhook_tolerance_seconds=p.integer("WEBHOOK_TOLERANCE_SECONDS", 300, low=1),
            webhook_max_body_bytes=p.integer(
                "WEBHOOK_MAX_BODY_BYTES", 1024 * 1024, low=1024, high=64 * 1024 * 1024
            ),
            legacy_webhook_secret=p.secret("LEGACY_WEBHOOK_SECRET"),
            backend_url=p.url("BACKEND_URL", schemes=("http", "https")),
            backend_api_key=p.secret("BACKEND_API_KEY"),
            backend_timeout_seconds=p.number("BACKEND_TIMEOUT_SECONDS", 15.0, low=0.1),
            delivery_retry_schedule=p.durations(
                "DELIVERY_RETRY_SCHEDULE", DEFAULT_RETRY_SCHEDULE
            ),
            auth_jwks_url=p.url("AUTH_JWKS_URL", schemes=("http", "https")),
            auth_issuer=p.text("AUTH_ISSUER"),
            auth_audience=p.text("AUTH_AUDIENCE"),
            auth_authorized_parties=p.words("AUTH_AUTHORIZED_PARTIES", sep=","),
            auth_hs256_secret=p.secret("AUTH_HS256_SECRET", check=_check_hs256),
            request_max_body_bytes=p.integer(
                "REQUEST_MAX_BODY_BYTES", 16 * 1024 * 1024, low=1024
            ),
            sse_heartbeat_seconds=p.number("SSE_HEARTBEAT_SECONDS", 15.0, low=0.1),
            http_header_timeout_seconds=p.number("HTTP_HEADER_TIMEOUT_SECONDS", 30.0, low=0.1),
            http_body_timeout_seconds=p.number("HTTP_BODY_TIMEOUT_SECONDS", 60.0, low=0.1),
            db_pool_min=p.integer("DB_POOL_MIN", 2, low=0, high=1000),
            db_pool_max=p.integer("DB_POOL_MAX", 10, low=1, high=1000),
            log_level=p.choice(
                "LOG_LEVEL", "info", ("debug", "info", "warning", "error", "critical")
            ),
            embedded_allowed=p.choice("SORAMI_EMBEDDED", "on", ("on", "off")) == "on",
            job_timeout_image_seconds=p.integer("JOB_TIMEOUT_IMAGE_SECONDS", 15 * 60, low=60),
            job_timeout_video_seconds=p.integer("JOB_TIMEOUT_VIDEO_SECONDS", 60 * 60, low=60),
            dedupe_retention_seconds=p.integer(
                "DEDUPE_RETENTION_SECONDS", 7 * 86400, low=3600
            ),
            reconcile_audit_retention_seconds=p.integer(
                "RECONCILE_AUDIT_RETENTION_SECONDS", 30 * 86400, low=3600
            ),
            http_max_request_line_bytes=p.integer(
                "HTTP_MAX_REQUEST_LINE_BYTES", 8190, low=256, high=1024 * 1024
            ),
            http_max_header_field_bytes=p.integer(
                "HTTP_MAX_HEADER_FIELD_BYTES", 8190, low=256, high=1024 * 1024
            ),
            http_max_header_bytes=p.integer(
                "HTTP_MAX_HEADER_BYTES", 32768, low=256, high=16 * 1024 * 1024
            ),
            cors_allowed_origins=p.origins("CORS_ALLOWED_ORIGINS"),
            auth_session_cookie=p.cookie_name("AUTH_SESSION_COOKIE", "__session"),
            review_operators=p.words("REVIEW_OPERATORS"),
            user_max_active_image_jobs=p.integer("USER_MAX_ACTIVE_IMAGE_JOBS", 10, low=0),
            user_max_active_video_jobs=p.integer("USER_MAX_ACTIVE_VIDEO_JOBS", 3, low=0),
            user_max_image_jobs_per_hour=p.integer("USER_MAX_IMAGE_JOBS_PER_HOUR", 200, low=0),
            user_max_video_jobs_per_hour=p.integer("USER_MAX_VIDEO_JOBS_PER_HOUR", 20, low=0),
            backend_max_in_flight_image_jobs=p.integer(
                "BACKEND_MAX_IN_FLIGHT_IMAGE_JOBS", 0, low=0),
            backend_max_in_flight_video_jobs=p.integer(
                "BACKEND_MAX_IN_FLIGHT_VIDEO_JOBS", 0, low=0),
            webhook_batch_max=p.integer("WEBHOOK_BATCH_MAX", 64, low=0, high=10_000),
            create_batch_max=p.integer("CREATE_BATCH_MAX", 64, low=0, high=10_000),
            batch_in_flight=p.integer("BATCH_IN_FLIGHT", 4, low=1, high=1000),
        )
        settings.check_consistency()
        return settings

    def check_consistency(self) -> None:
        """Rules that tie several variables together."""
        if self.auth_jwks_url and self.auth_hs256_secret:
            raise SettingsError(
                "AUTH_HS256_SECRET",
                "must not be set together with AUTH_JWKS_URL (one algorithm family at a time)",
            )
        if self.auth_jwks_url and not self.auth_issuer:
            raise SettingsError("AUTH_ISSUER", "is required when AUTH_JWKS_URL is set")
        if self.db_pool_min > self.db_pool_max:
            raise SettingsError("DB_POOL_MIN", "must not exceed DB_POOL_MAX")
        if self.batch_in_flight > self.db_pool_max:
            # each transaction in flight holds one of the pool's connections
            raise SettingsError("BATCH_IN_FLIGHT", "must not exceed DB_POOL_MAX")
        if self.dedupe_retention_seconds <= self.webhook_tolerance_seconds:
            # a delivery replayed within the signature tolerance must still be recognised
            raise SettingsError(
                "DEDUPE_RETENTION_SECONDS", "must be longer than WEBHOOK_TOLERANCE_SECONDS"
            )
        if self.http_max_header_field_bytes > self.http_max_header_bytes:
            # one header field could never reach its own limit
            raise SettingsError(
                "HTTP_MAX_HEADER_FIELD_BYTES", "must not exceed HTTP_MAX_HEADER_BYTES"
            )

    def check_serving(self) -> None:
        """What `serve` needs beyond well-formed values: a way to verify both callers."""
        if not self.webhook_secrets and self.legacy_webhook_secret is None:
            raise SettingsError(
                "WEBHOOK_SECRETS",
                "is required when DATABASE_URL is set (or set LEGACY_WEBHOOK_SECRET)",
            )
        if not self.auth_jwks_url and self.auth_hs256_secret is None:
            raise SettingsError(
                "AUTH_JWKS_URL",
                "is required when DATABASE_URL is set (or AUTH_HS256_SECRET for development)",
            )


def webhook_key(secret: str) -> bytes:
    """The raw HMAC key behind a ``whsec_`` secret (raises binascii.Error if not base64)."""
    return base64.b64decode(secret.removeprefix("whsec_"), validate=True)


def _check_postgres_url(value: str) -> str | None:
    try:
        DatabaseURL.parse(value)
    except InvalidDatabaseURL as exc:
        return str(exc)
    return None


def _check_hs256(value: str) -> str | None:
    if len(value.encode()) < 32:
        return "must be at least 32 bytes long"
    return None


class _Parser:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def secret(self, name: str, check: _Check | None = None) -> Secret | None:
        value = self.text(name)
        if value is None:
            return None
        if check is not None and (problem := check(value)) is not None:
            raise SettingsError(name, problem)
        return Secret(value)

    def integer(self, name: str, default: int, *, low: int, high: int | None = None) -> int:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(name, f"must be an integer, got {raw[:40]!r}") from None
        _check_range(name, value, low, high)
        return value

    def number(self, name: str, default: float, *, low: float) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, f"must be a number, got {raw[:40]!r}") from None
        if not value >= low:
            raise SettingsError(name, f"must be at least {low}")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() not in allowed:
            raise SettingsError(name, f"must be one of {', '.join(allowed)}")
        return raw.lower()

    def url(self, name: str, *, schemes: tuple[str, ...]) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise SettingsError(name, f"must be an absolute {'/'.join(schemes)} URL")
        return raw.rstrip("/")

    def words(self, name: str, *, sep: str | None = None) -> tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return ()
        return tuple(w.strip() for w in raw.split(sep) if w.strip())

    def origins(self, name: str) -> tuple[str, ...]:
        """Exact browser origins, as a browser writes them in its `Origin` header."""
        found: list[str] = []
        for word in self.words(name):
            if "*" in word:
                raise SettingsError(
                    name, "must list exact origins: a wildcard cannot be allowed together "
                    "with credentials (the bearer token and the session cookie)"
                )
            origin = _origin(word)
            if origin is None:
                raise SettingsError(
                    name, f"{word[:80]!r} is not an origin like https://app.example.com "
                    "(scheme and host, an optional port, no path)"
                )
            if origin not in found:
                found.append(origin)
        return tuple(found)

    def cookie_name(self, name: str, default: str) -> str | None:
        """A cookie's name; set and empty turns the feature off."""
        if name not in self.env:
            return default
        value = self.env[name].strip()
        if not value:
            return None
        if not _COOKIE_NAME.fullmatch(value):
            raise SettingsError(name, f"{value[:80]!r} is not a valid cookie name")
        return value

    def whsec_list(self, name: str) -> tuple[Secret, ...]:
        secrets = []
        for index, word in enumerate(self.words(name), start=1):
            if not word.startswith("whsec_"):
                raise SettingsError(name, f"secret #{index} must start with 'whsec_'")
            try:
                key = webhook_key(word)
            except (binascii.Error, ValueError):
                raise SettingsError(name, f"secret #{index} is not valid base64") from None
            if len(key) < 16:
                raise SettingsError(name, f"secret #{index} must decode to at least 16 bytes")
            secrets.append(Secret(word))
        return tuple(secrets)

    def durations(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        words = self.words(name)
        if not words:
            return default
        values = []
        for word in words:
            seconds = parse_duration(word)
            if seconds is None or seconds <= 0:
                raise SettingsError(
                    name, f"{word[:20]!r} is not a duration like 5s, 30s, 2m, 2h"
                )
            values.append(seconds)
        return tuple(values)


_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# RFC 6265 cookie-name: an RFC 9110 token
_COOKIE_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _origin(text: str) -> str | None:
    """`text` as the serialized origin a browser sends (lowercase, no default port), or None."""
    try:
        parts = urlsplit(text.removesuffix("/"))
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if (scheme not in _DEFAULT_PORTS or not host or parts.path or parts.query
            or parts.fragment or parts.username is not None or text.endswith("//")):
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def parse_duration(text: str) -> float | None:
    """'90' / '90s' / '2m' / '1.5h' -> seconds; None when malformed."""
    text = text.strip().lower()
    for unit in ("ms", "s", "m", "h", "d"):
        if text.endswith(unit):
            number, factor = text[: -len(unit)], _UNITS[unit]
            break
    else:
        number, factor = text, 1.0
    try:
        return float(number) * factor
    except ValueError:
        return None


def _check_range(name: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(name, f"must be {bound}, got {value}")

