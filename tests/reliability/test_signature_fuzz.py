"""Signature fuzzing against a served gateway: flipped bytes in the body, id, timestamp and
signature; garbage and oversized header values; non-UTF-8 bodies; timestamps at the edges
of the tolerance; replays; a secret rotation, then the old secret removed. No answer is a
5xx, every signature rejection has the same 401 body, and no rejected request writes a row.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import time
import uuid

import asyncpg
import hypothesis
import msgspec
from hypothesis import strategies as st

from tests.conftest import WEBHOOK_KEY, WEBHOOK_SECRET
from tests.reliability.conftest import Figures
from tests.reliability.served import served, table_digest, webhook_head
from tests.signing import sign

ROUTES = ("/api/webhooks/image-completion", "/api/webhooks/video-completion")
NEW_KEY = b"sorami-rotated-webhook-key-32byt"
NEW_SECRET = "whsec_" + base64.b64encode(NEW_KEY).decode()
TOLERANCE = 300  # WEBHOOK_TOLERANCE_SECONDS by default
FUZZ_EXAMPLES = 1200
# HTTP_MAX_HEADER_FIELD_BYTES: a longer header field is refused with 431 before any handler
HEADER_FIELD_LIMIT = 8190
# bytes a header value may carry on the wire (RFC 9110 field-vchar and obs-text)
VALUE_BYTES = [*range(0x21, 0x7F), *range(0x80, 0x100)]


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    body: bytes


def post(port: int, route: str, headers: dict[str, bytes | str], body: bytes) -> Answer:
    """One request with exactly these bytes, on its own connection (blocking)."""
    head = webhook_head(route, headers, len(body)) + b"\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    return Answer(int(head_bytes.split()[1]), rest)


def progress(job_id: str, value: int = 60) -> bytes:
    return msgspec.json.encode({"job_id": job_id, "status": "generating", "progress": value})


def delivery(job_id: str, key: bytes = WEBHOOK_KEY, timestamp: int | None = None,
             value: int = 60) -> tuple[dict[str, bytes | str], bytes]:
    body = progress(job_id, value)
    when = int(time.time()) if timestamp is None else timestamp
    return dict(sign(body, key, f"msg_{uuid.uuid4().hex}", when)), body


@dataclasses.dataclass(frozen=True)
class Mutation:
    """How a valid delivery is spoiled: `what` names it for the figures."""

    what: str
    target: str  # "body" or a header name
    position: int = 0
    byte: int = 0
    garbage: bytes = b""


def _as_value(raw: bytes) -> bytes:
    """Any bytes made into a header value the HTTP layer accepts."""
    return bytes(VALUE_BYTES[b % len(VALUE_BYTES)] for b in raw)


def _oversized(n: int) -> bytes:
    return (b"v1," + b"A" * 44 + b" ") * (n // 48 + 1)


HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
mutations = st.one_of(
    st.builds(Mutation, what=st.just("flip body"), target=st.just("body"),
              position=st.integers(0, 10**6), byte=st.integers(1, 255)),
    *(st.builds(Mutation, what=st.just(f"flip {h}"), target=st.just(h),
                position=st.integers(0, 10**6), byte=st.sampled_from(VALUE_BYTES))
      for h in HEADERS),
    *(st.builds(Mutation, what=st.just(f"garbage {h}"), target=st.just(h),
                garbage=st.binary(max_size=300).map(_as_value))
      for h in HEADERS),
    *(st.builds(Mutation, what=st.just(f"oversized {h}"), target=st.just(h),
                garbage=st.integers(1000, HEADER_FIELD_LIMIT - 200).map(
                    lambda n: _oversized(n)[:n]))
      for h in HEADERS),
    st.builds(Mutation, what=st.just("non-UTF-8 body"), target=st.just("body"),
              garbage=st.binary(min_size=1, max_size=512).map(lambda b: b"\xff\xfe" + b)),
    st.builds(Mutation, what=st.just("missing header"), target=st.sampled_from(HEADERS)),
)


def spoil(headers: dict[str, bytes | str], body: bytes,
          m: Mutation) -> tuple[dict[str, bytes | str], bytes]:
    headers = dict(headers)
    if m.what == "missing header":
        del headers[m.target]
    elif m.target == "body":
        if m.garbage:
            body = m.garbage
        else:
            at = m.position % len(body)
            body = body[:at] + bytes([body[at] ^ m.byte]) + body[at + 1:]
    elif m.garbage or m.what.startswith("garbage"):
        headers[m.target] = m.garbage
    else:
        value = str(headers[m.target]).encode()
        at = m.position % len(value)
        new = m.byte if m.byte != value[at] else (m.byte + 1) % 0x7F or 0x21
        headers[m.target] = value[:at] + bytes([new]) + value[at + 1:]
    return headers, body


async def _job(dsn: str) -> str:
    job_id = str(uuid.uuid4())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO jobs (id, kind, user_id, prompt, prompt_norm, status, progress)"
            " VALUES ($1, 'image', 'user_fuzz', 'a fox', 'a fox', 'QUEUED', 0)", job_id)
    finally:
        await conn.close()
    return job_id


async def test_fuzzed_signatures_are_one_401_and_write_nothing(
    database_url: str, figures: Figures
) -> None:
    job_id = await _job(database_url)
    route = ROUTES[0]
    statuses: dict[int, int] = {}
    unauthorized_bodies: set[bytes] = set()
    by_kind: dict[str, int] = {}

    def record(answer: Answer) -> None:
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        if answer.status == 401:
            unauthorized_bodies.add(answer.body)

    async with served(database_url,
                      WEBHOOK_SECRETS=f"{WEBHOOK_SECRET} {NEW_SECRET}") as gw:
        # rotation, both secrets configured: each one is accepted
        for key in (WEBHOOK_KEY, NEW_KEY):
            headers, body = delivery(job_id, key)
            assert post(gw.port, route, headers, body).status == 200
        replayed_headers, replayed_body = headers, body
        before = await table_digest(database_url)

        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(m=mutations, use_video=st.booleans(),
                          key=st.sampled_from([WEBHOOK_KEY, NEW_KEY]))
        def fuzz(m: Mutation, use_video: bool, key: bytes) -> None:
            headers, body = spoil(*delivery(job_id, key), m)
            answer = post(gw.port, ROUTES[use_video], headers, body)
            record(answer)
            by_kind[m.what] = by_kind.get(m.what, 0) + 1
            assert answer.status == 401, (m, answer)

        await asyncio.to_thread(fuzz)

        # validly signed but outside the tolerance, in the past and in the future
        now = int(time.time())
        for stamp in (now - TOLERANCE - 1, now - TOLERANCE - 60, now + TOLERANCE + 3,
                      now + 10 * TOLERANCE):
            answer = post(gw.port, route, *delivery(job_id, timestamp=stamp))
            record(answer)
            assert answer.status == 401
        # replays: the same signature under another id, another timestamp, another route
        for name, value in (("webhook-id", f"msg_{uuid.uuid4().hex}"),
                            ("webhook-timestamp", str(int(time.time()) + 1))):
            answer = post(gw.port, route, replayed_headers | {name: value}, replayed_body)
            record(answer)
            assert answer.status == 401
        # header values past what the HTTP layer reads: refused there, never a 5xx
        for name, size in (("webhook-id", HEADER_FIELD_LIMIT + 10),
                           ("webhook-signature", 4 * HEADER_FIELD_LIMIT)):
            headers, body = delivery(job_id)
            answer = post(gw.port, route, headers | {name: _oversized(size)[:size]}, body)
            record(answer)
            assert answer.status == 431
        # a validly signed body that is not UTF-8 (so not JSON): 400, nothing written
        junk = b"\xff\xfe\xfd" + bytes(range(256))
        signed_junk = post(gw.port, route, dict(sign(junk, NEW_KEY, "msg_junk", now)), junk)
        record(signed_junk)
        after = await table_digest(database_url)

        # an exact replay of an accepted delivery is a duplicate and changes nothing
        replay = post(gw.port, route, replayed_headers, replayed_body)
        # the edges of the tolerance are inside it
        now = int(time.time())
        edges = [post(gw.port, route, *delivery(job_id, timestamp=stamp, value=61 + n)).status
                 for n, stamp in enumerate((now - TOLERANCE + 2, now + TOLERANCE))]
        fuzzed = sum(by_kind.values())

    # the old secret removed: only the new one verifies
    async with served(database_url, WEBHOOK_SECRETS=NEW_SECRET) as gw:
        rotated_before = await table_digest(database_url)
        old = post(gw.port, route, *delivery(job_id, WEBHOOK_KEY, value=70))
        record(old)
        rotated_after = await table_digest(database_url)
        new = post(gw.port, route, *delivery(job_id, NEW_KEY, value=71))
        both_headers, both_body = delivery(job_id, NEW_KEY, value=72)
        old_mac = sign(both_body, WEBHOOK_KEY, str(both_headers["webhook-id"]),
                       int(str(both_headers["webhook-timestamp"])))["webhook-signature"]
        both_headers["webhook-signature"] = f"{old_mac} {both_headers['webhook-signature']}"
        both = post(gw.port, route, both_headers, both_body)

    rejected = fuzzed + 4 + 2 + 2 + 1 + 1
    figures["fuzzed requests (hypothesis examples)"] = fuzzed
    for what, count in sorted(by_kind.items()):
        figures[f"  {what}"] = count
    figures["rejected requests in all"] = rejected
    figures["answers by status"] = dict(sorted(statuses.items()))
    figures["5xx"] = sum(n for s, n in statuses.items() if s >= 500)
    figures["distinct 401 bodies"] = len(unauthorized_bodies)
    figures["rows written by rejected requests"] = _changed(before, after) + _changed(
        rotated_before, rotated_after)

    assert figures["5xx"] == 0
    assert statuses == {401: rejected - 3, 431: 2, 400: 1}
    assert len(unauthorized_bodies) == 1
    assert after == before
    assert rotated_after == rotated_before
    assert signed_junk.status == 400
    assert (replay.status, msgspec.json.decode(replay.body)) == (200, {"outcome": "duplicate"})
    assert edges == [200, 200]
    assert old.status == 401
    assert new.status == 200
    assert both.status == 200


def _changed(before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]) -> int:
    """Rows added or removed, over every table (0 when nothing changed at all)."""
    return sum(abs(after[t][0] - before[t][0]) for t in before) + sum(
        1 for t in before if after[t] != before[t] and after[t][0] == before[t][0])

