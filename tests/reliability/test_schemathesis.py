"""The served API against its own `/openapi.json`, by schemathesis, on a real `serve` process
with a valid HS256 bearer token: the schema's examples, the coverage phase's boundary and
invalid values, and fuzzed positive and negative requests, for every operation.

Checks: no 5xx; each answer's status code, content type, headers and body are documented
ones; negative data (what the schema forbids) is refused with a 4xx; an operation declaring
bearer security refuses a request without the token. Nothing is excluded: the event stream
is exercised too (a generated id is never a real job's, so it answers 404 at once and no
stream stays open), and so are `/metrics`, `/readyz` and the webhooks, whose generated
requests are signed as the backend signs them so that their payloads reach validation.

The document is built at import time from the same factory `serve` uses, since pytest
collects one test per operation before any server runs; the fixture then checks that the
running server serves exactly this document, so what is tested is what is served.

What is generated depends only on the seed, never on luck: a fixed one by default (what CI
runs every time), today's date with `SORAMI_SCHEMATHESIS_SEED=date` (a second CI run that
looks further each day), or the number given there to replay a run. A failure names its
seed. Requests over the server's head limits are not left to chance either: every operation
gets an over-long request line, an over-long header field and too large a header block,
and must answer them as documented.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import requests
import schemathesis

from gateway.app import create_app
from gateway.openapi import build_document
from gateway.settings import Secret, Settings
from tests.conftest import HS256_SECRET, WEBHOOK_KEY, WEBHOOK_SECRET
from tests.pg import Databases
from tests.procs import free_port, serve_env, start
from tests.signing import sign
from tests.tokens import hs256_token

# bounded for CI: examples per operation and generation mode, besides the coverage phase's
MAX_EXAMPLES = 50
FIXED_SEED = 24_601


def _seed(choice: str | None) -> int:
    """The run's seed: fixed unless SORAMI_SCHEMATHESIS_SEED says `date` or a number."""
    if not choice:
        return FIXED_SEED
    if choice == "date":
        return int(datetime.datetime.now(datetime.UTC).strftime("%Y%m%d"))
    if not choice.isdigit():
        raise ValueError(f"SORAMI_SCHEMATHESIS_SEED must be `date` or a number, got {choice!r}")
    return int(choice)


SEED = _seed(os.environ.get("SORAMI_SCHEMATHESIS_SEED", "").strip())
REPLAY = f"schemathesis seed {SEED}: replay with SORAMI_SCHEMATHESIS_SEED={SEED}"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "ignored_auth",
)
TOKEN = hs256_token("user_schemathesis", ttl=3600)


def _document() -> dict[str, Any]:
    """What `serve` answers on /openapi.json (no database is touched to build it)."""
    settings = Settings(
        database_url=Secret("postgresql://127.0.0.1/unused"),
        webhook_secrets=(Secret(WEBHOOK_SECRET),),
        auth_hs256_secret=Secret(HS256_SECRET),
    )
    document: dict[str, Any] = msgspec.json.decode(
        msgspec.json.encode(build_document(create_app(settings))))
    return document


DOCUMENT = _document()
CONFIG = schemathesis.Config.from_dict({
    # the token goes where the document's `bearer` scheme says, so schemathesis also sends
    # requests without it (ignored_auth, negative cases) and knows when it left it out
    "auth": {"openapi": {"bearer": {"bearer": TOKEN}}},
    # the seed alone decides what is generated: no example database replays earlier runs
    "seed": SEED,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
               "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
    "checks": {
        "enabled": False,
        **{name: {"enabled": True} for name in CHECKS},
        # schemathesis's default list of refusals lacks 413, the documented answer of a body
        # over the size limit (a negative case can be a very long body)
        # 414 and 431: a negative case can be a very long query or header
        "negative_data_rejection": {"enabled": True, "expected-statuses": [
            "400", "401", "403", "404", "405", "406", "409", "413", "414", "415", "422",
            "428", "429", "431", "5xx"]},
    },
    "request-timeout": 10,
})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


def _wait_ready(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url}/readyz not ready within {timeout}s")


class Tally:
    def __init__(self) -> None:
        self.operations: set[str] = set()
        self.examples = 0
        self.modes: collections.Counter[str] = collections.Counter()
        self.statuses: collections.Counter[int] = collections.Counter()
        self.failures: list[str] = []


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def gateway_url(databases: Databases) -> Iterator[str]:
    """One `serve` process for every operation, on a database of its own."""
    dsn = asyncio.run(databases.clone())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(["serve", "--no-migrate"], serve_env(dsn, PORT=str(port)))
    try:
        _wait_ready(url)
        with urllib.request.urlopen(f"{url}/openapi.json", timeout=10) as resp:
            assert msgspec.json.decode(resp.read()) == DOCUMENT
        yield url
    finally:
        code, err = proc.stop()
        asyncio.run(databases.drop(dsn))
    assert code == 0, err[-3000:]
    # an unexpected exception in a handler, or a request aiohttp could not parse and the
    # gateway did not answer itself, is logged at error level
    errors = [line for line in err.splitlines() if '"level": "error"' in line]
    assert not errors, f"{REPLAY}\n" + "\n".join(errors)[-3000:]


WEBHOOKS = ("/api/webhooks/image-completion", "/api/webhooks/video-completion")


def signed_call(case: Any, base_url: str, session: requests.Session) -> requests.Response:
    """The request schemathesis made for a webhook case, signed as the backend signs, so that
    the payload (positive or negative) reaches validation instead of stopping at the 401."""
    kwargs = case.as_transport_kwargs(base_url=base_url)
    body = kwargs.pop("data", None)
    if "json" in kwargs:
        body = json.dumps(kwargs.pop("json")).encode()
    raw = body.encode() if isinstance(body, str) else (body or b"")
    headers = {k: v for k, v in kwargs.pop("headers").items()
               if k.lower() not in ("webhook-id", "webhook-timestamp", "webhook-signature")}
    signature = sign(raw, WEBHOOK_KEY, f"msg_{uuid.uuid4().hex}", int(time.time()))
    signature.pop("Content-Type")  # the case's own (possibly wrong) content type stays
    return session.request(data=raw, headers={**headers, **signature}, timeout=10, **kwargs)


@schema.parametrize()
def test_the_api_conforms_to_its_openapi_document(
    case: Any, gateway_url: str, tally: Tally, http: requests.Session
) -> None:
    tally.operations.add(case.operation.label)
    tally.examples += 1
    tally.modes[case.meta.generation.mode.value if case.meta else "explicit"] += 1
    if case.operation.path in WEBHOOKS:
        response = signed_call(case, gateway_url, http)
    else:
        response = case.call(base_url=gateway_url, session=http)
    tally.statuses[response.status_code] += 1
    try:
        case.validate_response(response, transport_kwargs={"base_url": gateway_url})
    except BaseException as failure:  # schemathesis raises a BaseExceptionGroup
        tally.failures.append(f"{case.operation.label}: {str(failure)[:300]}")
        failure.add_note(REPLAY)
        raise


OPERATIONS = [result.ok() for result in schema.get_all_operations()]
# over the defaults: HTTP_MAX_REQUEST_LINE_BYTES, HTTP_MAX_HEADER_FIELD_BYTES (8190 each) and
# HTTP_MAX_HEADER_BYTES (32768); each field of the block is under the per-field limit
OVERSIZED = {
    "request line": (414, {}, 9000),
    "header field": (431, {"X-Padding": "p" * 9000}, 0),
    "header block": (431, {f"X-Padding-{i}": "p" * 7000 for i in range(5)}, 0),
}


@pytest.mark.parametrize("oversized", OVERSIZED)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.label)
def test_an_over_long_request_is_answered_as_documented(
    operation: Any, oversized: str, gateway_url: str, tally: Tally, http: requests.Session
) -> None:
    status, headers, query_bytes = OVERSIZED[oversized]
    case = operation.Case(
        path_parameters={p.name: "x" for p in operation.path_parameters},
        query={"padding": "q" * query_bytes} if query_bytes else {},
        headers={"Authorization": f"Bearer {TOKEN}", **headers},
    )
    response = case.call(base_url=gateway_url, session=http, timeout=10)
    tally.statuses[response.status_code] += 1
    assert response.status_code == status, response.text[:300]
    # schemathesis's response: lower-case names, each with its list of values
    assert response.headers["content-type"] == ["application/problem+json"]
    assert response.headers["connection"] == ["close"]
    assert response.json()["status"] == status
    try:
        case.validate_response(response, transport_kwargs={"base_url": gateway_url})
    except BaseException as failure:
        tally.failures.append(f"{case.operation.label} ({oversized}): {str(failure)[:300]}")
        raise


def test_schemathesis_figures(tally: Tally, figures: Any) -> None:
    """The run's figures (this test runs after the operations' tests, in file order)."""
    documented = sum(len(item) for item in DOCUMENT["paths"].values())
    figures["seed"] = SEED
    figures["operations in the document"] = documented
    figures["operations exercised"] = len(tally.operations)
    figures["examples"] = tally.examples
    figures["examples by mode"] = ", ".join(f"{m}: {n}" for m, n in sorted(tally.modes.items()))
    figures["answers by status"] = ", ".join(
        f"{code}: {n}" for code, n in sorted(tally.statuses.items()))
    figures["failures"] = len(tally.failures)
    assert not tally.failures, tally.failures[:5]
    assert len(tally.operations) == documented
