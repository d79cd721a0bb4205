"""User A against everything user B owns, on a real `serve` process: every route that takes an
id, as `/openapi.json` lists them (a new route is probed without editing this test), with
every one of B's ids, answers A exactly like an id that exists nowhere (404, same body), the
event stream included, and changes nothing anywhere. Listings show A none of B's rows, even
with B's cursors, and B's Idempotency-Key gives A a job of A's own.

B's data is made the way production makes it: jobs created through the API, moved along
by signed webhooks (queued, generating, saving, completed with files, failed) or cancelled
by B; notifications created by those webhooks, one of them read by B."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp

from gateway.jobs.kinds import Kind
from gateway.store import Database
from tests.conftest import HS256_SECRET, WEBHOOK_KEY
from tests.reliability.auth_support import (
    Gateway,
    bearer_operations,
    openapi_document,
    serve_gateway,
    snapshot,
)
from tests.signing import signed
from tests.tokens import user

A, B = "user_a", "user_b"
TIMEOUT = aiohttp.ClientTimeout(total=30)
# the statuses B's jobs are left in, and the webhooks (or the cancel) that get them there
STATUSES = ("PENDING", "QUEUED", "GENERATING", "SAVING", "COMPLETED", "FAILED", "CANCELLED")


def request_body(kind: Kind, n: int, owner: str) -> dict[str, Any]:
    prompt = f"{owner}'s {kind.value} number {n}: a quiet harbour at dawn"
    if kind is Kind.IMAGE:
        return {"prompt": prompt, "num_images": 2, "format": "WEBP"}
    return {"prompt": prompt, "duration_seconds": 6, "aspect_ratio": "9:16"}


def webhooks(kind: Kind, job_id: str, status: str) -> Iterator[dict[str, Any]]:
    """The backend's deliveries that take a fresh job to `status`."""
    path = ("QUEUED", "GENERATING", "SAVING")
    for step, word in enumerate(path, start=1):
        if status == "PENDING" or status == "CANCELLED":
            return
        yield {"job_id": job_id, "status": word.lower(), "progress": step * 25}
        if status == word:
            return
    if status == "FAILED":
        yield {"job_id": job_id, "status": "failed", "error_message": "the model refused"}
        return
    files = [{"url": f"https://cdn.example/{job_id}/{n}", "format": "webp",
              "size_bytes": 1000 + n, "dimensions": "1024x1024",
              **({"duration_seconds": 6.0} if kind is Kind.VIDEO else {})} for n in range(2)]
    metadata = {"model_name": "m", "generation_time_seconds": 3}
    yield {"job_id": job_id, "status": "completed",
           "data": {kind.plural: files, "metadata": metadata}}


class Client:
    def __init__(self, session: aiohttp.ClientSession, gateway: Gateway) -> None:
        self.session = session
        self.base = gateway.url

    async def request(self, method: str, path: str, sub: str, *, payload: Any = None,
                      headers: dict[str, str] | None = None
                      ) -> tuple[int, str, bytes, dict[str, str]]:
        async with self.session.request(method, self.base + path, json=payload,
                                        headers={**user(sub), **(headers or {})}) as resp:
            body = await asyncio.wait_for(resp.read(), 15)
            return resp.status, resp.content_type, body, dict(resp.headers)

    async def create(self, kind: Kind, n: int, owner: str, key: str) -> str:
        status, _, body, _ = await self.request(
            "POST", f"/api/{kind.plural}/generate", owner, payload=request_body(kind, n, owner),
            headers={"Idempotency-Key": key})
        assert status == 202, body
        job_id: str = json.loads(body)["job_id"]
        return job_id

    async def webhook(self, kind: Kind, payload: dict[str, Any], expect: int = 200) -> None:
        body, headers = signed(payload, WEBHOOK_KEY, f"msg_{uuid.uuid4().hex}")
        async with self.session.post(f"{self.base}/api/webhooks/{kind.value}-completion",
                                     data=body, headers=headers) as resp:
            assert resp.status == expect, await resp.text()

    async def job_in(self, kind: Kind, n: int, owner: str, status: str) -> str:
        job_id = await self.create(kind, n, owner, key=f"{owner}-{kind.value}-{n}")
        for payload in webhooks(kind, job_id, status):
            await self.webhook(kind, payload)
        if status == "CANCELLED":
            code, _, body, _ = await self.request(
                "POST", f"/api/{kind.plural}/{job_id}/cancel", owner)
            assert code == 200, body
        code, _, body, _ = await self.request("GET", f"/api/{kind.plural}/{job_id}/status", owner)
        assert code == 200
        assert json.loads(body)["status"] == status
        return job_id


def ids_in(value: Any) -> set[str]:
    """Every `id` and `job_id` anywhere in a JSON answer, as text."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("id", "job_id") and item is not None:
                found.add(str(item))
            found |= ids_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= ids_in(item)
    return found


async def test_user_a_gets_404_for_every_id_of_user_b_on_every_route(
    database_url: str, db: Database, figures: Any
) -> None:
    async with (
        serve_gateway(database_url, AUTH_HS256_SECRET=HS256_SECRET) as gateway,
        aiohttp.ClientSession(timeout=TIMEOUT) as session,
    ):
        api = Client(session, gateway)
        operations = bearer_operations(await openapi_document(session, gateway.url))

        # B's jobs in every status, both kinds; A's own jobs so A's listings are not empty
        b_jobs = {(kind, status): await api.job_in(kind, n, B, status)
                  for kind in Kind for n, status in enumerate(STATUSES)}
        a_jobs = {await api.job_in(kind, 0, A, "COMPLETED") for kind in Kind}
        b_notes = [r["id"] for r in await db.fetch(
            "SELECT id FROM notifications WHERE user_id = $1 ORDER BY id", B)]
        assert len(b_notes) == 4  # completed and failed, of each kind
        code, _, _, _ = await api.request("POST", f"/api/notifications/{b_notes[0]}/read", B)
        assert code == 200
        b_ids = [*b_jobs.values(), *map(str, b_notes)]
        missing = {"job": str(uuid.uuid4()),
                   "note": str(await db.fetchval("SELECT max(id) + 1000 FROM notifications"))}

        # the review console's routes are for REVIEW_OPERATORS only: A, not one, gets 403
        operator_only = [op for op in operations
                         if op[1].startswith(("/review", "/api/review/"))]
        user_routes = [op for op in operations if op not in operator_only]
        with_id = [op for op in user_routes if "{id}" in op[1]]
        listings = [op for op in user_routes if "{id}" not in op[1] and op[0] == "GET"]
        creates = [op for op in user_routes
                   if op[1].endswith("/generate") and op[0] == "POST"]
        unclassified = (set(operations) - set(operator_only) - set(with_id) - set(listings)
                        - set(creates))
        assert not unclassified, f"a new kind of route: say how isolation applies {unclassified}"
        assert ("GET", "/api/jobs/{id}/events") in with_id

        # an orphan of B's kind: a webhook under a backend id no job has
        orphan = f"bk-orphan-{uuid.uuid4().hex[:8]}"
        await api.webhook(Kind.IMAGE, {"job_id": orphan, "status": "queued", "progress": 5},
                          expect=202)

        before = await snapshot(db)

        # 0. the review console, as A (authenticated, not an operator): 403 everywhere, one
        # body, whether the orphan exists or not; no body is read, nothing changes
        refusals = []
        for method, path in operator_only:
            for backend_id in (orphan, f"bk-missing-{uuid.uuid4().hex[:8]}"):
                concrete = path.replace("{kind}", "image").replace("{backend_job_id}",
                                                                    backend_id)
                refusals.append((method, path, *await api.request(
                    method, concrete, A, payload={"reason": "mine", "job_id": b_jobs[
                        (Kind.IMAGE, "PENDING")], "count": 1})))
        not_refused = [(m, p, code) for m, p, code, ctype, _, _ in refusals
                       if (code, ctype) != (403, "application/problem+json")]
        assert not not_refused, not_refused
        assert len({body for *_, body, _ in refusals}) == 1

        # 1. every id-taking route, every id of B (and the Last-Event-ID resume of the stream)
        async def probe(method: str, path: str, id_: str, extra: dict[str, str]) -> Any:
            form = "note" if id_.isdigit() else "job"
            theirs = await api.request(method, path.replace("{id}", id_), A, headers=extra)
            absent = await api.request(method, path.replace("{id}", missing[form]), A,
                                       headers=extra)
            return method, path, id_, theirs, absent

        probes = [(method, path, id_, extra) for method, path in with_id for id_ in b_ids
                  for extra in ([{}, {"Last-Event-ID": "1"}] if path.endswith("/events")
                                else [{}])]
        answers = await asyncio.gather(*(probe(*p) for p in probes))
        wrong = [(m, p, i, t[0], t[1]) for m, p, i, t, a in answers
                 if not (t[0] == a[0] == 404
                         and t[1] == a[1] == "application/problem+json"
                         and t[2] == a[2])]
        assert not wrong, wrong[:20]

        # 2. listings: none of B's rows, with or without B's own cursors
        leaked: list[tuple[str, str]] = []
        listing_calls = 0
        for _, path in listings:
            code, _, body, _ = await api.request("GET", f"{path}?limit=1", B)
            assert code == 200
            cursor = json.loads(body)["next_cursor"]
            assert cursor is not None  # B has more than one row in every listing
            for query in ("", "?limit=100", f"?cursor={cursor}", "?unread=true&limit=100"):
                if "unread" in query and "notifications" not in path:
                    continue
                code, _, body, _ = await api.request("GET", path + query, A)
                listing_calls += 1
                assert code == 200, body
                seen = ids_in(json.loads(body))
                leaked += [(path + query, i) for i in seen & set(b_ids)]
                if path.endswith("/user") and query != f"?cursor={cursor}":
                    assert seen & a_jobs, (path, query)  # A's own rows are there
        assert not leaked, leaked

        after = await snapshot(db)
        assert after == before  # no cancel, no read, no timestamp: nothing changed

        # 3. B's ids are real: B sees each of them
        for (kind, _), job_id in b_jobs.items():
            code, _, _, _ = await api.request("GET", f"/api/{kind.plural}/{job_id}/status", B)
            assert code == 200

        # 4. B's Idempotency-Key and body make A a job of A's own, never a replay of B's
        replays = 0
        for (kind, status), job_id in b_jobs.items():
            n = STATUSES.index(status)
            code, _, body, headers = await api.request(
                "POST", f"/api/{kind.plural}/generate", A, payload=request_body(kind, n, B),
                headers={"Idempotency-Key": f"{B}-{kind.value}-{n}"})
            assert code == 202
            assert json.loads(body)["job_id"] != job_id
            assert "Idempotent-Replayed" not in headers
            replays += 1
        owners = await db.fetch("SELECT user_id, count(*) AS n FROM jobs GROUP BY user_id")
        assert {r["user_id"]: r["n"] for r in owners} == {B: len(b_jobs), A: 2 + replays}

    figures["routes in /openapi.json with a bearer token"] = len(operations)
    figures["operator-only routes, 403 to a user"] = f"{len(operator_only)}, {len(refusals)}"
    figures["id routes"] = len(with_id)
    figures["B's ids (jobs + notifications)"] = f"{len(b_jobs)} + {len(b_notes)}"
    figures["routes x ids probed"] = len(probes)
    figures["404s like a missing id"] = sum(
        1 for *_, t, a in answers if t[0] == 404 and t[2] == a[2])
    figures["listing calls as A, B's rows seen"] = f"{listing_calls}, {len(leaked)}"
    figures["tables changed by the probes"] = sum(
        1 for name in before if before[name] != after[name])
    figures["B's idempotency keys reused by A, replayed"] = f"{replays}, 0"
