"""Who may post a webhook: Standard Webhooks signatures, rotation, tolerance, legacy header.

Every verification failure answers the same 401 body and writes nothing; limits, media type
and payload shape are checked in that order, before and after the signature.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import hypothesis
import msgspec
import pytest
import standardwebhooks
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from gateway.app import create_app
from gateway.errors import Unauthorized
from gateway.jobs.state import Status
from gateway.middleware import problem_from
from gateway.settings import Secret, Settings, webhook_key
from gateway.store import Database
from gateway.webhooks.handlers import UNAUTHORIZED_DETAIL
from gateway.webhooks.signing import signature, signature_headers
from gateway.webhooks.verify import VerificationFailed, Verifier
from tests.conftest import WEBHOOK_KEY, WEBHOOK_SECRET
from tests.factories import insert_job
from tests.signing import sign, signed

Client = TestClient[web.Request, web.Application]
IMAGE_ROUTE = "/api/webhooks/image-completion"
UNAUTHORIZED_BODY = problem_from(Unauthorized(UNAUTHORIZED_DETAIL)).body
OTHER_KEY = b"another-32-byte-key-for-rotation"
OTHER_SECRET = "whsec_" + base64.b64encode(OTHER_KEY).decode()
LEGACY_SECRET = "sorami-webhook-secret-key-2025"
EFFECT_TABLES = ("webhook_deliveries", "orphans", "orphan_events", "job_events", "job_files",
                 "notifications")


def generating(job_id: str, progress: int = 60) -> dict[str, Any]:
    return {"job_id": job_id, "status": "generating", "progress": progress}


async def post(client: Client, body: bytes, headers: dict[str, str]) -> Any:
    return await client.post(IMAGE_ROUTE, data=body, headers=headers)


async def effects(db: Database) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in EFFECT_TABLES}


async def assert_rejected(resp: Any, db: Database, job_id: str) -> None:
    """401, the one body, and nothing written anywhere."""
    assert resp.status == 401
    assert await resp.read() == UNAUTHORIZED_BODY
    assert resp.content_type == "application/problem+json"
    assert set((await effects(db)).values()) == {0}
    job = await db.fetchrow("SELECT status, progress, seq FROM jobs WHERE id = $1", job_id)
    assert job is not None
    assert (job["status"], job["progress"], job["seq"]) == ("QUEUED", 0, 1)


def counter(kind: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "sorami_webhooks_total", {"kind": kind, "outcome": outcome})
    return value or 0.0


@pytest.fixture
async def job_id(db: Database) -> str:
    return await insert_job(db)


# --- accepted ---------------------------------------------------------------------------

async def test_valid_signature_is_applied(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    resp = await post(client, body, headers)
    assert resp.status == 200
    assert await resp.json() == {"outcome": "applied"}
    job = await db.fetchrow("SELECT status, progress FROM jobs WHERE id = $1", job_id)
    assert job is not None
    assert (job["status"], job["progress"]) == (Status.GENERATING, 60)


async def test_both_secrets_of_a_rotation_are_accepted(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any], db: Database,
    job_id: str,
) -> None:
    settings = make_settings(webhook_secrets=(Secret(OTHER_SECRET), Secret(WEBHOOK_SECRET)))
    client = await aiohttp_client(create_app(settings))
    old = await post(client, *signed(generating(job_id, 30), WEBHOOK_KEY, "msg_old"))
    new = await post(client, *signed(generating(job_id, 60), OTHER_KEY, "msg_new"))
    assert (old.status, new.status) == (200, 200)
    assert await db.fetchval("SELECT count(*) FROM webhook_deliveries") == 2


async def test_one_valid_entry_among_several_signatures_is_accepted(
    client: Client, job_id: str
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["webhook-signature"] = (
        "v2,abc v1,!!notbase64!! v1 v1,"
        + base64.b64encode(b"x" * 32).decode() + " " + headers["webhook-signature"]
    )
    resp = await post(client, body, headers)
    assert resp.status == 200


async def test_signatures_made_by_the_standardwebhooks_package_verify(
    client: Client, db: Database, job_id: str
) -> None:
    sender = standardwebhooks.Webhook(WEBHOOK_SECRET)
    body = msgspec.json.encode(generating(job_id))
    now = dt.datetime.now(dt.UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": sender.sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now, body.decode()),
    }
    resp = await post(client, body, headers)
    assert resp.status == 200
    assert await db.fetchval("SELECT dedupe_key FROM webhook_deliveries") == (
        "id:msg_2KWPBgLlAfxdpx2AI54pPJ85f4W")


def test_the_signer_agrees_with_the_standardwebhooks_package() -> None:
    body = b'{"job_id": "j", "status": "queued"}'
    now = int(time.time())
    reference = standardwebhooks.Webhook(WEBHOOK_SECRET)
    headers = signature_headers(WEBHOOK_KEY, "msg_x", now, body)
    assert headers["webhook-signature"] == reference.sign(
        "msg_x", dt.datetime.fromtimestamp(now, dt.UTC), body.decode())
    # the reference verifier raises unless the signature matches
    assert reference.verify(body, headers) == {"job_id": "j", "status": "queued"}
    # the test helper's headers are the signer's, with the media type
    assert sign(body, WEBHOOK_KEY, "msg_x", now) == {"Content-Type": "application/json",
                                                      **headers}


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    key=st.binary(min_size=16, max_size=64),
    msg_id=st.text(min_size=1, max_size=64),
    timestamp=st.integers(min_value=0, max_value=2**33),
    body=st.text(max_size=256),
)
def test_every_signature_is_the_standardwebhooks_packages(
    key: bytes, msg_id: str, timestamp: int, body: str
) -> None:
    secret = "whsec_" + base64.b64encode(key).decode()
    # the key the gateway reads from a secret is the one the package reads
    assert webhook_key(secret) == key
    expected = standardwebhooks.Webhook(secret).sign(
        msg_id, dt.datetime.fromtimestamp(timestamp, dt.UTC), body)
    assert signature(webhook_key(secret), msg_id, timestamp, body.encode()) == expected


# --- every verification failure: one body, nothing written ------------------------------

async def test_missing_signature_headers_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    body = msgspec.json.encode(generating(job_id))
    resp = await post(client, body, {"Content-Type": "application/json"})
    await assert_rejected(resp, db, job_id)


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
async def test_each_missing_signature_header_is_401(
    client: Client, db: Database, job_id: str, header: str
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    del headers[header]
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_empty_signature_headers_are_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers.update({"webhook-id": "", "webhook-signature": ""})
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_signature_of_another_body_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    _, headers = signed(generating(job_id, 10), WEBHOOK_KEY, "msg_1")
    body = msgspec.json.encode(generating(job_id, 90))
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_signature_replayed_under_another_id_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["webhook-id"] = "msg_2"
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_signature_made_with_a_wrong_secret_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    body, headers = signed(generating(job_id), OTHER_KEY, "msg_1")
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_expired_timestamp_is_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1", int(time.time()) - 3600)
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_future_timestamp_is_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1", int(time.time()) + 3600)
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_garbage_timestamp_is_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["webhook-timestamp"] = "yesterday"
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_non_base64_signature_is_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["webhook-signature"] = "v1,!!!not base64!!!"
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_signature_of_an_unknown_version_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_overlong_webhook_id_is_401(client: Client, db: Database, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "m" * 300)
    await assert_rejected(await post(client, body, headers), db, job_id)


async def test_non_utf8_body_with_a_bad_signature_is_401(
    client: Client, db: Database, job_id: str
) -> None:
    body = b'{"job_id": "\xff\xfe", "status": "generating"}'
    _, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    await assert_rejected(await post(client, body, headers), db, job_id)


async def raw_post(client: Client, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Bytes on the wire, for headers no HTTP client library would send."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST " + IMAGE_ROUTE.encode() + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
        + b"\r\n" + head + b"\r\n" + body
    )
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize(
    "garbage",
    [
        {"webhook-id": b"msg_\xff\xfe"},
        {"webhook-id": "msg_é".encode()},
        {"webhook-timestamp": "\u0661\u0667\u0660\u0660".encode()},
        {"webhook-signature": b"v1,\xc3\xa9\xff"},
        {"webhook-id": b"msg 1"},
    ],
    ids=["id-latin1", "id-utf8", "timestamp-arabic-indic-digits", "signature-bytes", "id-space"],
)
async def test_non_ascii_or_garbage_header_bytes_are_401(
    client: Client, db: Database, job_id: str, garbage: dict[str, bytes]
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers.pop("Content-Type")
    raw = {k: v.encode() for k, v in headers.items()} | garbage
    head = b"".join(k.encode() + b": " + v + b"\r\n" for k, v in raw.items())
    status, answer = await raw_post(client, head, body)
    assert (status, answer) == (401, UNAUTHORIZED_BODY)
    assert set((await effects(db)).values()) == {0}


async def test_rejections_are_counted_as_invalid_signature(
    client: Client, job_id: str
) -> None:
    before = counter("image", "invalid_signature")
    body, headers = signed(generating(job_id), OTHER_KEY, "msg_1")
    await post(client, body, headers)
    assert counter("image", "invalid_signature") == before + 1


# --- tolerance edges, on the verifier with a fixed clock --------------------------------

NOW = 1_800_000_000


def verifier(tolerance: int = 300) -> Verifier:
    return Verifier((WEBHOOK_KEY,), tolerance_seconds=tolerance, clock=lambda: NOW + 0.999)


@pytest.mark.parametrize("offset", [-300, -299, 0, 299, 300])
def test_timestamps_inside_the_tolerance_are_accepted(offset: int) -> None:
    body = b"{}"
    verified = verifier().verify(sign(body, WEBHOOK_KEY, "msg_1", NOW + offset), body)
    assert verified.webhook_id == "msg_1"


@pytest.mark.parametrize(("offset", "reason"), [(-301, "expired_timestamp"),
                                                (301, "future_timestamp")])
def test_timestamps_just_outside_the_tolerance_are_rejected(offset: int, reason: str) -> None:
    body = b"{}"
    with pytest.raises(VerificationFailed) as failed:
        verifier().verify(sign(body, WEBHOOK_KEY, "msg_1", NOW + offset), body)
    assert failed.value.reason == reason


@pytest.mark.parametrize(
    "timestamp",
    ["abc", "", "-5", "1.7e9", " 1700000000", "1700000000.5", "9" * 40, "9" * 5000,
     "\u0661\u0667" + "\u0660" * 8],  # Arabic-Indic digits: str.isdigit() says yes
)
def test_every_garbage_timestamp_is_a_verification_failure(timestamp: str) -> None:
    headers = sign(b"{}", WEBHOOK_KEY, "msg_1", NOW) | {"webhook-timestamp": timestamp}
    with pytest.raises(VerificationFailed):
        verifier().verify(headers, b"{}")


@pytest.mark.parametrize(
    "signature",
    ["v1,!!!not base64!!!", "v1,abc", "v1,", "v1", ",,,", "v1,YWJj=", "v1,=" * 100,
     "v1,\udcff\udcfe", "v1,YWJj\u00e9"],
)
def test_every_malformed_signature_is_a_verification_failure(signature: str) -> None:
    headers = sign(b"{}", WEBHOOK_KEY, "msg_1", NOW) | {"webhook-signature": signature}
    with pytest.raises(VerificationFailed):
        verifier().verify(headers, b"{}")


def test_a_signature_with_its_unused_final_bits_changed_is_rejected() -> None:
    # base64 decoders ignore the last character's spare bits; such a variant is not the
    # signature that was sent, so it must not verify
    headers = sign(b"{}", WEBHOOK_KEY, "msg_1", NOW)
    encoded = headers["webhook-signature"].removeprefix("v1,")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = encoded.rstrip("=")[-1]
    variant = alphabet[alphabet.index(last) ^ 1]
    changed = encoded[: len(encoded.rstrip("=")) - 1] + variant + "="
    assert base64.b64decode(changed) == base64.b64decode(encoded)
    with pytest.raises(VerificationFailed):
        verifier().verify(headers | {"webhook-signature": "v1," + changed}, b"{}")


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    headers=st.dictionaries(
        st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature",
                         "x-webhook-secret"]),
        st.text(max_size=64) | st.just("v1,") | st.just(str(NOW)),
    ),
    body=st.binary(max_size=64),
)
def test_no_header_content_raises_anything_but_a_verification_failure(
    headers: dict[str, str], body: bytes
) -> None:
    check = Verifier((WEBHOOK_KEY,), tolerance_seconds=300, legacy_secret=LEGACY_SECRET,
                     clock=lambda: NOW)
    with contextlib.suppress(VerificationFailed):
        check.verify(headers, body)


def test_the_tolerance_comes_from_the_settings() -> None:
    settings = Settings(webhook_secrets=(Secret(WEBHOOK_SECRET),), webhook_tolerance_seconds=10)
    body = b"{}"
    check = Verifier.from_settings(settings)
    check.verify(sign(body, WEBHOOK_KEY, "msg_1", int(time.time()) - 5), body)
    with pytest.raises(VerificationFailed):
        check.verify(sign(body, WEBHOOK_KEY, "msg_1", int(time.time()) - 60), body)


def test_signature_is_computed_over_the_raw_bytes() -> None:
    body = b'{"a":1}'
    mac = hmac.new(WEBHOOK_KEY, b"msg_1.%d.%s" % (NOW, body), hashlib.sha256).digest()
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW),
               "webhook-signature": "v1," + base64.b64encode(mac).decode()}
    assert verifier().verify(headers, body).webhook_id == "msg_1"
    with pytest.raises(VerificationFailed):
        verifier().verify(headers, b'{"a": 1}')


# --- the legacy header ------------------------------------------------------------------

@pytest.fixture
async def legacy_client(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any]
) -> Client:
    settings = make_settings(legacy_webhook_secret=Secret(LEGACY_SECRET))
    client: Client = await aiohttp_client(create_app(settings))
    return client


def legacy_headers(secret: str = LEGACY_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Webhook-Secret": secret}


async def test_legacy_header_is_401_when_legacy_mode_is_off(
    client: Client, db: Database, job_id: str
) -> None:
    body = msgspec.json.encode(generating(job_id))
    await assert_rejected(await post(client, body, legacy_headers()), db, job_id)


async def test_legacy_header_is_accepted_and_counted_when_enabled(
    legacy_client: Client, db: Database, job_id: str
) -> None:
    before = counter("image", "legacy_auth")
    body = msgspec.json.encode(generating(job_id))
    resp = await post(legacy_client, body, legacy_headers())
    assert resp.status == 200
    assert await resp.json() == {"outcome": "applied"}
    assert counter("image", "legacy_auth") == before + 1
    assert await db.fetchval("SELECT status FROM jobs WHERE id = $1", job_id) == "GENERATING"


async def test_wrong_legacy_secret_is_401(
    legacy_client: Client, db: Database, job_id: str
) -> None:
    body = msgspec.json.encode(generating(job_id))
    for wrong in ("nope", LEGACY_SECRET + "x", LEGACY_SECRET[:-1], ""):
        resp = await post(legacy_client, body, legacy_headers(wrong))
        await assert_rejected(resp, db, job_id)


async def test_legacy_deliveries_without_an_id_dedupe_by_route_and_content(
    legacy_client: Client, db: Database, job_id: str
) -> None:
    body = msgspec.json.encode(generating(job_id))
    first = await post(legacy_client, body, legacy_headers())
    again = await post(legacy_client, body, legacy_headers())
    assert [await first.json(), await again.json()] == [
        {"outcome": "applied"}, {"outcome": "duplicate"}]
    key = await db.fetchval("SELECT dedupe_key FROM webhook_deliveries")
    assert key == "sha256:" + hashlib.sha256(IMAGE_ROUTE.encode() + b"\n" + body).hexdigest()


async def test_legacy_deliveries_with_an_id_dedupe_by_it(
    legacy_client: Client, db: Database, job_id: str
) -> None:
    body = msgspec.json.encode(generating(job_id))
    resp = await post(legacy_client, body, legacy_headers() | {"webhook-id": "msg_legacy"})
    assert resp.status == 200
    assert await db.fetchval("SELECT dedupe_key FROM webhook_deliveries") == "id:msg_legacy"


async def test_a_standard_signature_is_still_required_to_match_in_legacy_mode(
    legacy_client: Client, db: Database, job_id: str
) -> None:
    body, headers = signed(generating(job_id), OTHER_KEY, "msg_1")
    resp = await post(legacy_client, body, headers | legacy_headers())
    await assert_rejected(resp, db, job_id)


# --- limits, media type, payload --------------------------------------------------------

@pytest.fixture
async def small_client(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any]
) -> Client:
    client: Client = await aiohttp_client(create_app(make_settings(webhook_max_body_bytes=2048)))
    return client


def padded(job_id: str, size: int) -> bytes:
    body = msgspec.json.encode(generating(job_id))
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def test_body_one_byte_over_the_limit_is_413_before_the_signature(
    small_client: Client, db: Database, job_id: str
) -> None:
    before = counter("image", "too_large")
    body = padded(job_id, 2049)
    # unsigned: the size answer comes first, no HMAC is computed over an oversized body
    resp = await post(small_client, body, {"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["status"] == 413
    assert counter("image", "too_large") == before + 1
    assert set((await effects(db)).values()) == {0}


async def test_chunked_body_over_the_limit_is_413_while_reading(
    small_client: Client, db: Database, job_id: str
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")

    async def stream() -> AsyncIterator[bytes]:
        yield body[:-1]
        for _ in range(10):
            yield b" " * 512
        yield b"}"

    resp = await small_client.post(IMAGE_ROUTE, data=stream(), headers=headers)
    assert resp.status == 413
    assert set((await effects(db)).values()) == {0}


async def test_declared_length_over_the_limit_is_413_without_waiting_for_the_body(
    small_client: Client, db: Database
) -> None:
    reader, writer = await asyncio.open_connection(small_client.host, small_client.port)
    writer.write(b"POST " + IMAGE_ROUTE.encode() + b" HTTP/1.1\r\nHost: test\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{")
    # the answer comes although the body never does
    status_line = await asyncio.wait_for(reader.readline(), timeout=20)
    writer.close()
    assert status_line.split()[1] == b"413"
    assert set((await effects(db)).values()) == {0}


async def test_body_exactly_at_the_limit_is_accepted(
    small_client: Client, job_id: str
) -> None:
    body = padded(job_id, 2048)
    resp = await post(small_client, body, sign(body, WEBHOOK_KEY, "msg_1", int(time.time())))
    assert resp.status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/jsonp", None])
async def test_non_json_content_type_is_415(
    client: Client, db: Database, job_id: str, content_type: str | None
) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    del headers["Content-Type"]
    if content_type:
        headers["Content-Type"] = content_type
    resp = await client.post(IMAGE_ROUTE, data=body, headers=headers,
                             skip_auto_headers=["Content-Type"])
    assert resp.status == 415
    assert set((await effects(db)).values()) == {0}


async def test_json_content_type_with_a_charset_is_accepted(client: Client, job_id: str) -> None:
    body, headers = signed(generating(job_id), WEBHOOK_KEY, "msg_1")
    headers["Content-Type"] = "application/json; charset=utf-8"
    assert (await post(client, body, headers)).status == 200


@pytest.mark.parametrize("body", [b"not json", b'{"job_id": "x"', b"\xff\xfe{}", b""],
                         ids=["text", "truncated", "non-utf8", "empty"])
async def test_signed_body_that_is_not_json_is_400(
    client: Client, db: Database, job_id: str, body: bytes
) -> None:
    before = counter("image", "invalid_payload")
    resp = await post(client, body, sign(body, WEBHOOK_KEY, "msg_1", int(time.time())))
    assert resp.status == 400
    assert counter("image", "invalid_payload") == before + 1
    assert set((await effects(db)).values()) == {0}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"job_id": 12, "status": "generating"}, "$.job_id"),
        ({"status": "generating"}, "$.job_id"),
        ({"job_id": "x"}, "$.status"),
        ({"job_id": "x", "status": "exploded"}, "$.status"),
        ({"job_id": "x", "status": "generating", "progress": 250}, "$.progress"),
        ({"job_id": "x", "status": "completed", "data": {"images": [{"format": "PNG"}]}},
         "$.data.images[0].url"),
        ({"job_id": "x", "status": "failed", "error_message": "bad\u0000byte"},
         "$.error_message"),
        ([1, 2], None),
    ],
    ids=["job_id-type", "job_id-missing", "status-missing", "status-unknown", "progress-range",
         "file-url-missing", "nul-character", "not-an-object"],
)
async def test_wrong_shape_is_422_naming_the_field(
    client: Client, db: Database, job_id: str, payload: Any, field: str | None
) -> None:
    body, headers = signed(payload, WEBHOOK_KEY, "msg_1")
    resp = await post(client, body, headers)
    assert resp.status == 422
    problem = await resp.json()
    assert problem.get("field") == field
    assert set((await effects(db)).values()) == {0}


async def test_deeply_nested_body_is_422_not_a_crash(
    client: Client, db: Database, job_id: str
) -> None:
    body = (b'{"job_id": "x", "status": "generating", "extra": ' + b"[" * 5000 + b"]" * 5000
            + b"}")
    resp = await post(client, body, sign(body, WEBHOOK_KEY, "msg_1", int(time.time())))
    assert resp.status == 422
    assert set((await effects(db)).values()) == {0}
