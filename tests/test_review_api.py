"""The review console's JSON API and pages over HTTP, against a real PostgreSQL: who may use
them, the list and one orphan, assign and dismiss through the operators' use cases, refusals,
escaping, and forged cross-site posts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.jobs.kinds import Kind
from gateway.review.access import csrf_token
from gateway.settings import Settings
from gateway.store import Database
from tests.conftest import WEBHOOK_KEY
from tests.factories import insert_job
from tests.signing import signed
from tests.test_metrics import scrape
from tests.test_reconcile import payload, reconcile, record_orphan
from tests.tokens import bearer, hs256_token

Client = TestClient[Any, Any]
OPERATOR = "op_alice"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(review_operators=(OPERATOR, "op_bob"))


def op(sub: str = OPERATOR) -> dict[str, str]:
    return bearer(hs256_token(sub))


async def tie(db: Database, database_url: str, backend_id: str = "anon-1",
              prompt: str = "a red fox") -> tuple[str, str, str]:
    """Two users' jobs with one prompt and an orphan without a user: the reconciler's tie."""
    job_a = await insert_job(db, user_id="user_a", prompt=prompt, created_ago_seconds=60)
    job_b = await insert_job(db, user_id="user_b", prompt=prompt, created_ago_seconds=50)
    orphan = await record_orphan(db, payload(backend_id, prompt=prompt))
    await reconcile(database_url)
    return orphan, job_a, job_b


async def test_the_review_api_is_401_without_a_token_and_403_for_a_non_operator(
    client: Client,
) -> None:
    assert (await client.get("/api/review/orphans")).status == 401
    refused = await client.get("/api/review/orphans", headers=bearer(hs256_token("user_a")))
    assert refused.status == 403
    assert refused.content_type == "application/problem+json"
    assert (await client.get("/review", headers=bearer(hs256_token("user_a")))).status == 403
    assert (await client.get("/api/review/orphans", headers=op())).status == 200


async def test_a_tie_is_listed_with_its_reason_and_shown_with_both_candidates(
    client: Client, db: Database, database_url: str
) -> None:
    orphan, job_a, job_b = await tie(db, database_url)

    listed = await (await client.get("/api/review/orphans", headers=op())).json()
    (item,) = listed["orphans"]
    assert (item["backend_job_id"], item["reason"], item["rule"]) == (
        orphan, "ambiguous", "prompt_only")
    assert item["media_url"] == f"https://s3.example/{orphan}/1"
    assert listed["counts"] == {"ambiguous": 1}
    metrics = await scrape(client)
    assert metrics.value("sorami_orphans_open_by_reason", kind="image", reason="ambiguous") == 1

    shown = await (await client.get(f"/api/review/orphans/image/{orphan}", headers=op())).json()
    assert shown["hints"] == {"user_id": None, "prompt": "a red fox"}
    assert [e["status"] for e in shown["events"]] == ["completed"]
    assert shown["events"][0]["body"]["job_id"] == orphan
    assert shown["files"] == [{"url": f"https://s3.example/{orphan}/1", "format": "PNG",
                               "size_bytes": 524288, "width": 1024, "height": 1024,
                               "duration_seconds": None}]
    assert [d["outcome"] for d in shown["decisions"]] == ["ambiguous"]
    assert {c["job_id"] for c in shown["candidates"]} == {job_a, job_b}
    assert all(c["considered"] and c["same_prompt"] for c in shown["candidates"])
    assert (await client.get("/api/review/orphans/image/nope", headers=op())).status == 404
    assert (await client.get(f"/api/review/orphans/gif/{orphan}", headers=op())).status == 404


async def test_an_assignment_gives_the_job_its_files_one_notification_and_names_the_operator(
    client: Client, db: Database, database_url: str
) -> None:
    orphan, job_a, _ = await tie(db, database_url)

    answer = await client.post(f"/api/review/orphans/image/{orphan}/assign", headers=op(),
                               json={"job_id": job_a, "reason": "the fox is user_a's"})

    assert answer.status == 200, await answer.text()
    done = await answer.json()
    assert (done["outcome"], done["job_id"], done["job_status"], done["actor"]) == (
        "assigned", job_a, "COMPLETED", OPERATOR)
    result = await client.get(f"/api/images/{job_a}/result", headers=bearer(
        hs256_token("user_a")))
    assert [f["url"] for f in (await result.json())["images"]] == [
        f"https://s3.example/{orphan}/1"]
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = 'user_a'") == 1
    last = await db.fetchrow("SELECT actor, reason, outcome FROM reconcile_decisions "
                             "ORDER BY id DESC LIMIT 1")
    assert tuple(last) == (OPERATOR, "the fox is user_a's", "assigned")
    listed = await (await client.get("/api/review/orphans", headers=op())).json()
    assert listed["orphans"] == []


@pytest.mark.parametrize("case", ["other_user", "matched_already", "job_has_other_id",
                                  "no_job", "wrong_kind"])
async def test_every_refusal_of_the_command_line_is_a_problem_through_the_api(
    client: Client, db: Database, database_url: str, case: str
) -> None:
    job_b = await insert_job(db, user_id="user_b", prompt="a cat", created_ago_seconds=60)
    hinted = await record_orphan(db, payload("bk-hinted", user_id="user_a", prompt="a cat"))
    video_job = await insert_job(db, user_id="user_a", prompt="a cat", kind=Kind.VIDEO)
    target, job_id, expected = {
        "other_user": (hinted, job_b, "--allow-other-user"),
        "no_job": (hinted, "nope", "no job has id 'nope'"),
        "wrong_kind": (hinted, video_job, "is a video job and the orphan a image one"),
    }.get(case, (hinted, job_b, ""))
    if case == "matched_already":
        await client.post(f"/api/review/orphans/image/{hinted}/assign", headers=op(),
                          json={"job_id": job_b, "reason": "r", "allow_other_user": True})
        target, expected = hinted, "is assigned already"
    if case == "job_has_other_id":
        other = await record_orphan(db, payload("bk-2", user_id="user_b", prompt="a cat"))
        await client.post(f"/api/review/orphans/image/{other}/assign", headers=op(),
                          json={"job_id": job_b, "reason": "r"})
        expected = "already has another backend job id"
    before = await db.fetchval("SELECT count(*) FROM reconcile_decisions")

    answer = await client.post(f"/api/review/orphans/image/{target}/assign", headers=op(),
                               json={"job_id": job_id, "reason": "r",
                                     "allow_other_user": case == "job_has_other_id"})

    assert answer.status == 409
    assert answer.content_type == "application/problem+json"
    assert expected in (await answer.json())["detail"]
    assert await db.fetchval("SELECT count(*) FROM reconcile_decisions") == before


async def test_an_assignment_to_a_job_that_got_its_own_files_meanwhile_is_409(
    client: Client, db: Database, database_url: str
) -> None:
    orphan, job_a, _ = await tie(db, database_url)
    # while the operator looks, the backend completes job A under the job's own id
    body, headers = signed(payload(job_a, files=2), WEBHOOK_KEY, "msg-own-completion")
    completed = await client.post("/api/webhooks/image-completion", data=body,
                                  headers=headers)
    assert completed.status == 200, await completed.text()
    before = await db.fetchval("SELECT count(*) FROM reconcile_decisions")

    answer = await client.post(f"/api/review/orphans/image/{orphan}/assign", headers=op(),
                               json={"job_id": job_a, "reason": "the fox is user_a's"})

    assert answer.status == 409
    assert answer.content_type == "application/problem+json"
    assert (await answer.json())["detail"] == (
        f"job {job_a} has 2 file(s) already (COMPLETED): it is not waiting for these")
    assert await db.fetchval("SELECT count(*) FROM reconcile_decisions") == before
    assert await db.fetchval("SELECT count(*) FROM job_files WHERE job_id = $1", job_a) == 2
    assert await db.fetchval("SELECT state FROM orphans WHERE backend_job_id = $1",
                             orphan) == "unresolved"


async def test_a_stale_dismissal_is_409_naming_why_and_a_blank_reason_is_422(
    client: Client, db: Database
) -> None:
    orphan = await record_orphan(db, payload("bk-1", user_id="user_a", prompt="x"))
    url = f"/api/review/orphans/image/{orphan}/dismiss"

    blank = await client.post(url, headers=op(), json={"reason": "   "})
    first = await client.post(url, headers=op(), json={"reason": "a test call"})
    again = await client.post(url, headers=op("op_bob"), json={"reason": "also"})

    assert (blank.status, (await blank.json())["field"]) == (422, "reason")
    assert first.status == 200
    assert again.status == 409
    assert "is dismissed already" in (await again.json())["detail"]
    rows = await db.fetch("SELECT actor, outcome FROM reconcile_decisions")
    assert [tuple(r) for r in rows] == [(OPERATOR, "dismissed")]


async def test_the_list_filters_by_kind_user_and_normalised_prompt_and_pages_by_cursor(
    client: Client, db: Database
) -> None:
    for n in range(5):
        await record_orphan(db, payload(f"img-{n}", user_id="user_a" if n % 2 else "user_b",
                                        prompt=f"A  Red Fox number {n}"), seen_ago=100 - n)
    await record_orphan(db, payload("vid-1", kind=Kind.VIDEO, prompt="a whale"),
                        kind=Kind.VIDEO, seen_ago=200)

    async def ids(**query: Any) -> tuple[list[str], str | None]:
        page = await (await client.get("/api/review/orphans", headers=op(),
                                       params=query)).json()
        return [o["backend_job_id"] for o in page["orphans"]], page["next_cursor"]

    first, cursor = await ids(limit=4)
    assert first == ["vid-1", "img-0", "img-1", "img-2"]
    second, end = await ids(limit=4, cursor=cursor)
    assert (second, end) == (["img-3", "img-4"], None)
    assert (await ids(kind="video"))[0] == ["vid-1"]
    assert (await ids(user_id="user_a"))[0] == ["img-1", "img-3"]
    assert (await ids(q="red   FOX number 3"))[0] == ["img-3"]
    paged = await (await client.get("/api/review/orphans", headers=op(),
                                    params={"limit": 4, "cursor": cursor})).json()
    assert paged["counts"] is None
    bad = await client.get("/api/review/orphans", headers=op(), params={"cursor": "zzz"})
    assert bad.status == 422


async def test_a_bulk_dismissal_needs_the_count_the_operator_saw(
    client: Client, db: Database
) -> None:
    for n in range(3):
        await record_orphan(db, payload(f"spam-{n}", prompt="test ping"))
    await record_orphan(db, payload("keep", prompt="a real picture"))
    body = {"reason": "backend test traffic", "q": "TEST ping"}

    wrong = await client.post("/api/review/orphans/dismiss", headers=op(),
                              json={**body, "count": 2})
    right = await client.post("/api/review/orphans/dismiss", headers=op(),
                              json={**body, "count": 3})

    assert wrong.status == 409
    assert "matches 3 open orphans now, not 2" in (await wrong.json())["detail"]
    assert (await right.json()) == {"dismissed": 3, "refused": []}
    states = dict(await db.fetch("SELECT backend_job_id, state FROM orphans"))
    assert states == {"spam-0": "dismissed", "spam-1": "dismissed", "spam-2": "dismissed",
                      "keep": "unresolved"}


async def test_the_pages_escape_a_prompt_holding_a_script_and_forbid_framing(
    client: Client, db: Database
) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    orphan = await record_orphan(db, payload("bk-evil", user_id="<b>u</b>", prompt=evil))
    await insert_job(db, user_id="<b>u</b>", prompt=evil)

    for path in ("/review", f"/review/image/{orphan}"):
        page = await client.get(path, headers=op())
        html = await page.text()
        assert page.status == 200
        assert "<script>" not in html
        assert "<img src=x" not in html
        assert "<b>u</b>" not in html
        assert "&lt;script&gt;" in html
        assert page.headers["X-Frame-Options"] == "DENY"
        policy = page.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy
        assert "script-src" not in policy
        assert "default-src 'none'" in policy


async def test_a_forged_cross_site_post_with_the_session_cookie_is_refused(
    client: Client, db: Database
) -> None:
    orphan = await record_orphan(db, payload("bk-1", prompt="x"))
    session = hs256_token(OPERATOR)
    client.session.cookie_jar.update_cookies({"__session": session})
    url = f"/review/image/{orphan}/dismiss"
    own = str(client.make_url("")).rstrip("/")

    no_token = await client.post(url, data={"reason": "r"}, allow_redirects=False)
    wrong_token = await client.post(url, data={"reason": "r", "csrf_token": "0" * 64},
                                    allow_redirects=False)
    other_site = await client.post(
        url, data={"reason": "r", "csrf_token": csrf_token(session)},
        headers={"Origin": "https://evil.example"}, allow_redirects=False)
    api_no_token = await client.post(f"/api/review/orphans/image/{orphan}/dismiss",
                                     json={"reason": "r"})

    assert [r.status for r in (no_token, wrong_token, other_site, api_no_token)] == [
        403, 403, 403, 403]
    assert await db.fetchval("SELECT state FROM orphans") == "unresolved"
    page = await client.get(f"/review/image/{orphan}")
    assert csrf_token(session) in await page.text()
    done = await client.post(url, data={"reason": "r", "csrf_token": csrf_token(session)},
                             headers={"Origin": own}, allow_redirects=False)
    assert done.status == 303
    assert await db.fetchval("SELECT state FROM orphans") == "dismissed"
    assert await db.fetchval("SELECT actor FROM reconcile_decisions") == OPERATOR


def test_review_operators_are_read_as_space_separated_subjects_and_default_to_nobody() -> None:
    assert Settings.from_env({}).review_operators == ()
    listed = Settings.from_env({"REVIEW_OPERATORS": " op_alice  user_2abc "})
    assert listed.review_operators == ("op_alice", "user_2abc")
