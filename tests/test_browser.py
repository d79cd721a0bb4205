"""The gateway in a real headless Chromium: a page creates a job, follows it live, is refused.

Test origins are real servers on 127.0.0.1 with their own ports: `same` serves the page and
the gateway behind its reverse proxy (the app's origin); `page` serves the page alone, an
allowed origin calling `api`, the gateway's own origin; `stranger` serves the page from an
origin that is not allowed. They share one host, so the session cookie the page sets is
sent to all of them, as Clerk's is across one site. The generator backend is the simulated
one, sending its signed webhooks to the gateway.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.settings import Settings
from gateway.simulator import SimulatedBackend, SimulatorConfig, parse_mode
from gateway.store import Database
from tests.backend import eventually
from tests.browser import Front, chromium, require_chromium, screenshot
from tests.conftest import WEBHOOK_SECRET
from tests.factories import insert_job
from tests.tokens import hs256_token

Server = Callable[..., Awaitable[TestServer]]
# the page waits this long (ms) for what it should show
PAGE_TIMEOUT_MS = 30_000


@dataclasses.dataclass
class Stage:
    backend: SimulatedBackend
    same: Front  # the app's origin: the page, and the gateway behind its reverse proxy
    page: Front  # an allowed origin: the page alone
    api: Front  # the gateway's own origin
    stranger: Front  # an origin not allowed: the page alone

    def applied(self) -> int:
        return sum(1 for sent in self.backend.sent if sent.outcome == "applied")


@pytest.fixture
async def stage(make_settings: Callable[..., Settings], aiohttp_server: Server) -> Stage:
    # make_settings first: the database outlives the gateway's servers
    require_chromium()
    same, page = Front(page=True, proxy=True), Front(page=True, proxy=False)
    api, stranger = Front(page=False, proxy=True), Front(page=True, proxy=False)
    for front in (same, page, api, stranger):
        await front.start(aiohttp_server)
    backend = SimulatedBackend(SimulatorConfig(webhook_base="http://unset"))
    backend.public_url = str((await aiohttp_server(backend.app())).make_url("")).rstrip("/")
    settings = make_settings(
        backend_url=backend.public_url,
        delivery_retry_schedule=(0.05, 0.1, 0.2),
        # the same origin needs no CORS: only the page calling across origins is listed
        cors_allowed_origins=(page.origin,),
        # Clerk's azp is the origin of the page the token was made for
        auth_authorized_parties=(same.origin, page.origin),
    )
    gateway = str((await aiohttp_server(create_app(settings))).make_url("")).rstrip("/")
    same.upstream = api.upstream = gateway
    # a second and a half between webhooks leaves time to cut the stream in the middle
    backend.config = SimulatorConfig(webhook_base=gateway, webhook_secret=WEBHOOK_SECRET,
                                     mix=(parse_mode("honest"),), step_delay=1.5)
    return Stage(backend, same, page, api, stranger)


async def history(db: Database, job_id: str) -> list[tuple[int, str]]:
    """(seq, status) of every state the job has been in: created PENDING (seq 1), then each
    change recorded in job_events."""
    rows = await db.fetch("SELECT seq, status FROM job_events WHERE job_id = $1 ORDER BY seq",
                          job_id)
    return [(1, "PENDING"), *((row["seq"], row["status"]) for row in rows)]


@pytest.mark.parametrize("mode", ["same-origin", "cross-origin"])
async def test_a_page_creates_a_job_and_follows_it_live_through_a_dropped_connection(
    stage: Stage, db: Database, mode: str
) -> None:
    if mode == "same-origin":
        front, url, party = stage.same, f"{stage.same.origin}/", stage.same.origin
    else:
        front, party = stage.api, stage.page.origin
        url = f"{stage.page.origin}/?gateway={stage.api.origin}"
    session = hs256_token("user_a", azp=party, ttl=60)
    renewed = hs256_token("user_a", azp=party, ttl=60, jti="renewed")
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(url)
        await page.evaluate("token => setSession(token)", session)
        job_id = await page.evaluate(
            "([token, prompt]) => createJob(token, prompt)",
            [hs256_token("user_a", azp=party), "a red fox in the snow"],
        )
        await page.evaluate("jobId => follow(jobId)", job_id)
        await page.wait_for_function("() => seen.some(e => e.status === 'INITIALIZING')",
                                     timeout=PAGE_TIMEOUT_MS)
        before_cut: list[int] = await page.evaluate("() => seen.map(e => e.seq)")
        applied = stage.applied()

        async def moved_on_twice() -> bool:
            return stage.applied() >= applied + 2

        front.hold_streams()
        assert front.cut() == 1
        # Clerk renews the cookie, well within the 3 s the browser waits before reconnecting
        await page.evaluate("token => setSession(token)", renewed)
        # the backend moves the job on twice while the page is cut off: a reconnect that
        # started from the current state instead of Last-Event-ID would skip one
        await eventually(moved_on_twice, timeout=20)
        front.release_streams()

        await page.wait_for_function("() => files !== null", timeout=PAGE_TIMEOUT_MS)
        await page.wait_for_function(
            "() => [...document.images].every(i => i.complete && i.naturalWidth > 0)",
            timeout=PAGE_TIMEOUT_MS,
        )
        seen: list[dict[str, Any]] = await page.evaluate("() => seen")
        state = await page.evaluate(
            "() => ({opened, readyState: source.readyState, files, "
            "outcome: document.getElementById('outcome').textContent, "
            "log: document.getElementById('log').textContent})"
        )
        await screenshot(page, f"follow-live-{mode}")

    # every change from the first one shown, in order, none missed, none twice
    committed = await history(db, job_id)
    first = seen[0]["seq"]
    assert [(e["seq"], e["status"]) for e in seen] == [c for c in committed if c[0] >= first]
    assert [c[1] for c in committed] == ["PENDING", "QUEUED", "INITIALIZING", "GENERATING",
                                         "SAVING", "COMPLETED"]
    assert [c[0] for c in committed] == list(range(1, 7))
    assert [e["type"] for e in seen] == ["message"] * (len(seen) - 1) + ["end"]
    # the two changes after the cut were committed while the page was disconnected
    assert [e["seq"] for e in seen[len(before_cut):][:2]] == [before_cut[-1] + 1,
                                                             before_cut[-1] + 2]
    assert state["outcome"] == "finished: COMPLETED"
    assert state["opened"] == 2
    assert state["readyState"] == 2  # closed by the page on `end`: no reconnecting forever
    # the reconnect resumed after the last event seen, with the renewed session cookie
    streams = front.streams()
    assert len(streams) == 2
    assert "Last-Event-ID" not in streams[0].headers
    assert streams[0].cookie("__session") == session
    assert streams[1].headers["Last-Event-ID"] == str(before_cut[-1])
    assert streams[1].cookie("__session") == renewed
    assert all("Authorization" not in s.headers for s in streams)
    assert state["files"] == [f"{stage.backend.public_url}/files/{job_id}/image_1.png"]
    # the page could read the exposed X-Request-ID of its create
    assert re.search(rf"created {job_id} \(202\), request id [0-9a-f]{{32}}\n", state["log"])


async def probe_all(page: Any, job_id: str, token: str) -> dict[str, dict[str, Any]]:
    """What the page reads of: the job's status with the cookie, a create with the bearer
    token, and the job's event stream; or how the browser refused each."""
    answers = [
        await page.evaluate(
            "jobId => probe('status', `/api/images/${jobId}/status`, {credentials: 'include'})",
            job_id,
        ),
        await page.evaluate(
            """token => probe('create', '/api/images/generate', {
                 method: 'POST', body: JSON.stringify({prompt: 'a stolen fox'}),
                 headers: {'Authorization': `Bearer ${token}`,
                           'Content-Type': 'application/json'}})""",
            token,
        ),
        await page.evaluate("jobId => probeStream('stream', jobId)", job_id),
    ]
    return {answer["label"]: answer for answer in answers}


async def test_a_page_on_an_origin_not_allowed_cannot_read_the_api(
    stage: Stage, db: Database
) -> None:
    job_id = await insert_job(db, user_id="user_a")
    party = stage.page.origin
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{stage.stranger.origin}/?gateway={stage.api.origin}")
        await page.evaluate("token => setSession(token)", hs256_token("user_a", azp=party))
        refused = await probe_all(page, job_id, hs256_token("user_a", azp=party))
        await screenshot(page, "origin-not-allowed")
        stranger = list(stage.api.forwarded)

        # the same page from an allowed origin reads all three: the refusal is the origin's
        allowed_page = await browser.new_page()
        await allowed_page.goto(f"{stage.page.origin}/?gateway={stage.api.origin}")
        await allowed_page.evaluate("token => setSession(token)",
                                    hs256_token("user_a", azp=party))
        allowed = await probe_all(allowed_page, job_id, hs256_token("user_a", azp=party))
        await screenshot(allowed_page, "origin-allowed")

    for label in ("status", "create"):
        assert refused[label]["refused"].startswith("TypeError: Failed to fetch"), refused
    assert refused["stream"] == {"label": "stream", "error": "error", "readyState": 2}
    # the gateway did answer the simple GET: the browser kept the answer from the page
    (status_get,) = [f for f in stranger if f.method == "GET" and f.path.endswith("/status")]
    assert status_get.status == 200
    assert "Access-Control-Allow-Origin" not in status_get.answer_headers
    # the create's preflight was refused, so the create itself was never sent
    assert [(f.method, f.status) for f in stranger if f.path == "/api/images/generate"] == [
        ("OPTIONS", 405)
    ]
    assert await db.fetchval("SELECT count(*) FROM jobs") == 2  # the allowed page's create

    assert allowed["status"]["status"] == 200
    assert json.loads(allowed["status"]["body"])["job_id"] == job_id
    assert allowed["create"]["status"] == 202
    assert allowed["stream"] == {"label": "stream", "status": "QUEUED"}


async def test_a_cookie_for_another_user_sees_404_and_one_for_another_party_is_refused(
    stage: Stage, db: Database
) -> None:
    job_id = await insert_job(db, user_id="user_a")
    party = stage.same.origin
    reads = """jobId => Promise.all([
        probe('status', `/api/images/${jobId}/status`, {}),
        probe('result', `/api/images/${jobId}/result`, {}),
        probeStream('stream', jobId)])"""
    seen: dict[str, list[dict[str, Any]]] = {}
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(f"{stage.same.origin}/")
        for who, token in (
            ("another user", hs256_token("user_b", azp=party)),
            ("another party", hs256_token("user_a", azp="https://evil.example")),
            ("the owner", hs256_token("user_a", azp=party)),
        ):
            await page.evaluate("token => setSession(token)", token)
            seen[who] = await page.evaluate(reads, job_id)
        await screenshot(page, "session-cookie-of-others")

    def statuses(answers: list[dict[str, Any]]) -> list[Any]:
        return [a.get("status", a.get("error")) for a in answers]

    assert statuses(seen["another user"]) == [404, 404, "error"]
    assert statuses(seen["another party"]) == [401, 401, "error"]
    assert statuses(seen["the owner"]) == [200, 200, "QUEUED"]
    # the stream's refusals were answered by the gateway, not lost on the way
    assert [f.status for f in stage.same.streams()] == [404, 401, 200]
