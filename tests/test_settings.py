from __future__ import annotations

import pytest

from gateway.settings import DEFAULT_RETRY_SCHEDULE, Settings, SettingsError
from tests.conftest import WEBHOOK_SECRET


def test_defaults_with_an_empty_environment() -> None:
    s = Settings.from_env({})
    assert s.embedded
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.webhook_tolerance_seconds == 300
    assert s.webhook_max_body_bytes == 1024 * 1024
    assert s.legacy_webhook_secret is None
    assert s.delivery_retry_schedule == DEFAULT_RETRY_SCHEDULE
    assert (s.http_header_timeout_seconds, s.http_body_timeout_seconds) == (30.0, 60.0)


def test_read_deadlines_come_from_the_environment() -> None:
    s = Settings.from_env({"HTTP_HEADER_TIMEOUT_SECONDS": "5",
                           "HTTP_BODY_TIMEOUT_SECONDS": "2.5"})
    assert (s.http_header_timeout_seconds, s.http_body_timeout_seconds) == (5.0, 2.5)


def test_request_head_limits_default_to_aiohttps_and_come_from_the_environment() -> None:
    s = Settings.from_env({})
    assert (s.http_max_request_line_bytes, s.http_max_header_field_bytes,
            s.http_max_header_bytes) == (8190, 8190, 32768)
    s = Settings.from_env({"HTTP_MAX_REQUEST_LINE_BYTES": "4096",
                           "HTTP_MAX_HEADER_FIELD_BYTES": "16384",
                           "HTTP_MAX_HEADER_BYTES": "65536"})
    assert (s.http_max_request_line_bytes, s.http_max_header_field_bytes,
            s.http_max_header_bytes) == (4096, 16384, 65536)


def test_a_header_field_limit_over_the_header_block_limit_is_refused() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"HTTP_MAX_HEADER_FIELD_BYTES": "20000",
                           "HTTP_MAX_HEADER_BYTES": "10000"})
    assert raised.value.variable == "HTTP_MAX_HEADER_FIELD_BYTES"


def test_every_contract_variable_is_read() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:p@db:5432/sorami",
            "SORAMI_DATA_DIR": "/var/lib/sorami",
            "HOST": "0.0.0.0",
            "PORT": "9000",
            "WEBHOOK_SECRETS": f"{WEBHOOK_SECRET} {WEBHOOK_SECRET}",
            "WEBHOOK_TOLERANCE_SECONDS": "60",
            "LEGACY_WEBHOOK_SECRET": "legacy",
            "BACKEND_URL": "http://backend:9006/",
            "BACKEND_API_KEY": "key",
            "AUTH_JWKS_URL": "https://clerk.example/.well-known/jwks.json",
            "AUTH_ISSUER": "https://clerk.example",
            "AUTH_AUDIENCE": "sorami",
            "AUTH_AUTHORIZED_PARTIES": "https://app.example, https://www.app.example",
            "DELIVERY_RETRY_SCHEDULE": "1s 2m 1h",
        }
    )
    assert not s.embedded
    assert s.port == 9000
    assert len(s.webhook_keys()) == 2
    assert s.backend_url == "http://backend:9006"
    assert s.auth_authorized_parties == ("https://app.example", "https://www.app.example")
    assert s.delivery_retry_schedule == (1.0, 120.0, 3600.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WEBHOOK_SECRETS", "nope"),
        ("WEBHOOK_SECRETS", "whsec_***"),
        ("WEBHOOK_SECRETS", "whsec_c2hvcnQ="),
        ("WEBHOOK_TOLERANCE_SECONDS", "0"),
        ("DATABASE_URL", "mysql://x/y"),
        ("BACKEND_URL", "ftp://backend"),
        ("AUTH_HS256_SECRET", "short"),
        ("DELIVERY_RETRY_SCHEDULE", "5s soon"),
        ("LOG_LEVEL", "loud"),
        ("HTTP_HEADER_TIMEOUT_SECONDS", "0"),
        ("HTTP_BODY_TIMEOUT_SECONDS", "soon"),
        ("HTTP_MAX_REQUEST_LINE_BYTES", "100"),
        ("HTTP_MAX_HEADER_FIELD_BYTES", "8k"),
        ("HTTP_MAX_HEADER_BYTES", "-1"),
    ],
)
def test_malformed_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert raised.value.variable == variable


def test_jwks_and_hs256_together_are_refused() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env(
            {
                "AUTH_JWKS_URL": "https://clerk.example/jwks",
                "AUTH_ISSUER": "https://clerk.example",
                "AUTH_HS256_SECRET": "x" * 40,
            }
        )
    assert raised.value.variable == "AUTH_HS256_SECRET"


def test_jwks_requires_an_issuer() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"AUTH_JWKS_URL": "https://clerk.example/jwks"})
    assert raised.value.variable == "AUTH_ISSUER"


def test_secrets_never_show_in_repr() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:hunter2@db/sorami",
            "WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "BACKEND_API_KEY": "backend-key-123",
            "AUTH_HS256_SECRET": "h" * 40,
        }
    )
    text = repr(s) + str(s)
    for secret in ("hunter2", WEBHOOK_SECRET, "backend-key-123", "h" * 40):
        assert secret not in text


def test_serving_with_an_external_database_needs_secrets() -> None:
    s = Settings.from_env({"DATABASE_URL": "postgresql://db/sorami"})
    with pytest.raises(SettingsError) as raised:
        s.check_serving()
    assert raised.value.variable == "WEBHOOK_SECRETS"
