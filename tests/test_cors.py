"""CORS on the client API, header by header: allowed origins exactly, nobody else, no wildcard."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.cors import ALLOWED_HEADERS, MAX_AGE_SECONDS
from gateway.settings import Settings, SettingsError
from gateway.store import Database
from tests.conftest import WEBHOOK_KEY
from tests.factories import insert_job
from tests.procs import clean_env
from tests.signing import signed
from tests.tokens import user

APP = "https://app.sorami.test"
OTHER = "https://evil.example"
Client = TestClient[Any, Any]


@pytest.fixture
async def cors_client(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> Client:
    client: Client = await aiohttp_client(
        create_app(make_settings(cors_allowed_origins=(APP, "http://localhost:3000")))
    )
    return client


def cors_fields(resp: aiohttp.ClientResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items()
            if k.lower().startswith("access-control-")}


def varies_on_origin(resp: aiohttp.ClientResponse) -> bool:
    return "origin" in [v.strip().lower() for v in resp.headers.get("Vary", "").split(",")]


def preflight(origin: str, method: str = "POST",
              headers: str = "authorization, content-type, idempotency-key") -> dict[str, str]:
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers}


async def test_preflight_from_an_allowed_origin_allows_the_api_methods_and_headers(
    cors_client: Client,
) -> None:
    resp = await cors_client.options("/api/images/generate", headers=preflight(APP))
    assert resp.status == 204
    fields = cors_fields(resp)
    assert fields["access-control-allow-origin"] == APP
    assert fields["access-control-allow-credentials"] == "true"
    assert fields["access-control-allow-methods"] == "POST"
    allowed = [h.strip().lower() for h in fields["access-control-allow-headers"].split(",")]
    assert allowed == [h.lower() for h in ALLOWED_HEADERS]
    assert {"authorization", "content-type", "idempotency-key", "last-event-id"} <= set(allowed)
    assert 0 < int(fields["access-control-max-age"]) == MAX_AGE_SECONDS <= 7200
    assert varies_on_origin(resp)


async def test_preflight_of_the_event_stream_allows_last_event_id(cors_client: Client) -> None:
    resp = await cors_client.options(
        "/api/jobs/some-id/events",
        headers=preflight("http://localhost:3000", "GET", "last-event-id"),
    )
    assert resp.status == 204
    fields = cors_fields(resp)
    assert fields["access-control-allow-origin"] == "http://localhost:3000"
    assert fields["access-control-allow-methods"] == "GET"
    assert "Last-Event-ID" in fields["access-control-allow-headers"]


@pytest.mark.parametrize(
    "origin",
    [OTHER, "null", "http://app.sorami.test", "https://app.sorami.test.evil.example",
     "https://APP.sorami.test", "https://app.sorami.test:8443"],
)
async def test_preflight_from_a_disallowed_origin_gets_no_cors_headers(
    cors_client: Client, aiohttp_client: Callable[..., Any], settings: Settings, origin: str
) -> None:
    resp = await cors_client.options("/api/images/generate", headers=preflight(origin))
    assert cors_fields(resp) == {}
    # the same answer as a gateway without CORS gives
    plain: Client = await aiohttp_client(create_app(settings))
    before = await plain.options("/api/images/generate", headers=preflight(origin))
    assert (resp.status, resp.headers["Allow"]) == (before.status, before.headers["Allow"])
    assert resp.status == 405


@pytest.mark.parametrize("path", ["/api/images/some-id/status", "/api/jobs/some-id/events",
                                  "/api/notifications/7/read"])
async def test_options_without_a_requested_method_is_answered_as_without_cors(
    cors_client: Client, aiohttp_client: Callable[..., Any], settings: Settings, path: str
) -> None:
    plain: Client = await aiohttp_client(create_app(settings))
    before = await plain.options(path, headers={"Origin": APP})
    resp = await cors_client.options(path, headers={"Origin": APP})
    assert (resp.status, resp.headers["Allow"]) == (before.status, before.headers["Allow"])
    assert resp.status == 405
    assert (await resp.json())["status"] == 405


async def test_an_answer_to_an_allowed_origin_names_it_and_exposes_the_header_fields(
    cors_client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    resp = await cors_client.get(f"/api/images/{job_id}/status",
                                 headers={**user("user_a"), "Origin": APP})
    assert resp.status == 200
    fields = cors_fields(resp)
    assert fields["access-control-allow-origin"] == APP
    assert fields["access-control-allow-credentials"] == "true"
    exposed = {h.strip() for h in fields["access-control-expose-headers"].split(",")}
    assert {"Retry-After", "Location", "X-Request-ID", "Idempotent-Replayed"} <= exposed
    assert varies_on_origin(resp)


async def test_errors_reach_an_allowed_origin_readable(cors_client: Client) -> None:
    # a page must be able to read a 401 to send its user to sign in again
    resp = await cors_client.post("/api/images/generate", json={"prompt": "x"},
                                  headers={"Origin": APP})
    assert resp.status == 401
    assert cors_fields(resp)["access-control-allow-origin"] == APP
    assert varies_on_origin(resp)


async def test_a_created_job_answers_an_allowed_origin(cors_client: Client) -> None:
    resp = await cors_client.post("/api/images/generate", json={"prompt": "a fox"},
                                  headers={**user("user_a"), "Origin": APP,
                                           "Idempotency-Key": "k-1"})
    assert resp.status == 202
    assert cors_fields(resp)["access-control-allow-origin"] == APP


async def test_answers_to_other_origins_and_without_origin_vary_but_carry_no_cors(
    cors_client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    for headers in ({"Origin": OTHER}, {}):
        resp = await cors_client.get(f"/api/images/{job_id}/status",
                                     headers={**user("user_a"), **headers})
        assert resp.status == 200
        assert (await resp.json())["job_id"] == job_id
        assert cors_fields(resp) == {}
        assert varies_on_origin(resp)


async def test_the_event_stream_answers_an_allowed_origin(
    cors_client: Client, db: Database
) -> None:
    job_id = await insert_job(db)
    async with cors_client.get(f"/api/jobs/{job_id}/events",
                               headers={**user("user_a"), "Origin": APP}) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        assert cors_fields(resp)["access-control-allow-origin"] == APP
        assert varies_on_origin(resp)


async def test_webhook_and_operations_routes_are_not_cross_origin(cors_client: Client) -> None:
    hook = await cors_client.options("/api/webhooks/image-completion", headers=preflight(APP))
    assert hook.status == 405
    assert cors_fields(hook) == {}
    body, headers = signed({"job_id": "nobody", "status": "initializing"}, WEBHOOK_KEY, "msg_1")
    delivered = await cors_client.post("/api/webhooks/image-completion", data=body,
                                       headers={**headers, "Origin": APP})
    assert delivered.status == 202
    assert cors_fields(delivered) == {}
    assert not varies_on_origin(delivered)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        resp = await cors_client.get(path, headers={"Origin": APP})
        assert cors_fields(resp) == {}, path
        ops = await cors_client.options(path, headers=preflight(APP, "GET"))
        assert (ops.status, cors_fields(ops)) == (405, {}), path


async def test_without_allowed_origins_nothing_is_added(client: Client, db: Database) -> None:
    job_id = await insert_job(db)
    resp = await client.get(f"/api/images/{job_id}/status",
                            headers={**user("user_a"), "Origin": APP})
    assert resp.status == 200
    assert cors_fields(resp) == {}
    assert "Vary" not in resp.headers
    assert (await client.options("/api/images/generate", headers=preflight(APP))).status == 405


@pytest.mark.parametrize(
    ("raw", "origins"),
    [("https://App.Sorami.test", ("https://app.sorami.test",)),
     ("https://app.sorami.test:443/ http://localhost:3000", ("https://app.sorami.test",
                                                            "http://localhost:3000")),
     ("http://[::1]:8080", ("http://[::1]:8080",))],
)
def test_origins_are_kept_as_a_browser_writes_them(raw: str, origins: tuple[str, ...]) -> None:
    assert Settings.from_env({"CORS_ALLOWED_ORIGINS": raw}).cors_allowed_origins == origins


@pytest.mark.parametrize(
    "raw", ["*", "https://*.sorami.test", "app.sorami.test", "https://app.sorami.test/path",
            "ftp://app.sorami.test", "https://user@app.sorami.test", "null"],
)
def test_anything_but_an_exact_origin_is_refused(raw: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"CORS_ALLOWED_ORIGINS": f"{APP} {raw}"})
    assert caught.value.variable == "CORS_ALLOWED_ORIGINS"


def test_a_wildcard_origin_stops_serve_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"],
        env=clean_env(CORS_ALLOWED_ORIGINS="*", SORAMI_DATA_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("sorami-gateway: error: CORS_ALLOWED_ORIGINS:")
    assert "wildcard" in lines[0]
    assert not (tmp_path / "pg").exists()  # refused before anything started
