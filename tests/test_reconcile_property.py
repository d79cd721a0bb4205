"""Properties of matching over generated users, prompts, jobs and orphans.

Whatever the mix: an orphan naming a user never reaches another user's job, no job gets two
orphans, an ambiguous orphan is never linked, an orphan without user is linked only when
its prompt points to exactly one job and one orphan left (the others went elsewhere in the
same run) or when every candidate left with its prompt belongs to the one user it went to,
and one user's orphans with one prompt are paired with that user's jobs in time order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.state import Status
from gateway.store import Database
from reconcile.runner import CLOCK_SKEW_SECONDS
from tests.factories import insert_job
from tests.test_reconcile import payload, reconcile, record_orphan

USERS = ("user_a", "user_b", "user_c")
# variants of two prompts that normalise together, and one of their own
PROMPTS = ("a cat", "A  CAT", "a cat\t", "a dog", "A Dog", "a bird")
WINDOW = 3 * 3600.0


@dataclasses.dataclass(frozen=True)
class GenJob:
    user: str
    prompt: str
    created_ago: int
    status: Status
    kind: Kind


@dataclasses.dataclass(frozen=True)
class GenOrphan:
    user: str | None
    prompt: str | None
    seen_ago: int
    kind: Kind


jobs_strategy = st.lists(
    st.builds(
        GenJob,
        user=st.sampled_from(USERS),
        prompt=st.sampled_from(PROMPTS),
        created_ago=st.integers(min_value=60, max_value=4 * 3600),
        status=st.sampled_from([Status.QUEUED, Status.QUEUED, Status.GENERATING,
                                Status.TIMED_OUT, Status.COMPLETED]),
        kind=st.sampled_from([Kind.IMAGE, Kind.IMAGE, Kind.VIDEO]),
    ),
    max_size=8,
)
orphans_strategy = st.lists(
    st.builds(
        GenOrphan,
        user=st.one_of(st.none(), st.sampled_from(USERS)),
        prompt=st.one_of(st.none(), st.sampled_from(PROMPTS)),
        seen_ago=st.integers(min_value=0, max_value=4 * 3600),
        kind=st.sampled_from([Kind.IMAGE, Kind.IMAGE, Kind.VIDEO]),
    ),
    max_size=8,
)


async def _reset(db: Database) -> None:
    await db.execute(
        "TRUNCATE jobs, orphans, orphan_events, webhook_deliveries, reconcile_runs,"
        " reconcile_decisions, reconcile_plan CASCADE"
    )


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(jobs=jobs_strategy, orphans=orphans_strategy)
async def test_matching_never_crosses_users_never_links_twice_and_never_links_a_doubt(
    db: Database, database_url: str, jobs: list[GenJob], orphans: list[GenOrphan]
) -> None:
    await _reset(db)
    for job in jobs:
        await insert_job(db, user_id=job.user, prompt=job.prompt, status=job.status,
                         kind=job.kind, created_ago_seconds=job.created_ago)
    for n, o in enumerate(orphans):
        body = payload(f"bk-{n}", kind=o.kind, user_id=o.user, prompt=o.prompt)
        await record_orphan(db, body, kind=o.kind, seen_ago=o.seen_ago)

    jobs_before = await db.fetch(
        "SELECT id, kind, user_id, prompt_norm, status, created_at FROM jobs")
    result = await reconcile(database_url, window_seconds=WINDOW, image_timeout_seconds=10**6,
                             video_timeout_seconds=10**6)

    rows = await db.fetch(
        "SELECT o.kind, o.backend_job_id, o.user_id, o.prompt_norm, o.first_seen_at,"
        " o.state, o.job_id, d.outcome, d.rule, j.user_id AS job_user, j.kind AS job_kind,"
        " j.created_at AS job_created_at"
        " FROM orphans o"
        " JOIN reconcile_decisions d ON d.kind = o.kind AND d.backend_job_id = o.backend_job_id"
        " LEFT JOIN jobs j ON j.id = o.job_id"
        " WHERE d.run_id = $1",
        result.run_id,
    )
    # a decision row for every orphan looked at, and one only
    assert len(rows) == len(orphans) == result.counts["looked_at"]
    linked = [r for r in rows if r["job_id"] is not None]
    # never a job linked twice
    assert len({r["job_id"] for r in linked}) == len(linked)
    aliases = await db.fetch("SELECT job_id, count(*) AS n FROM job_aliases GROUP BY job_id")
    assert all(a["n"] == 1 for a in aliases)
    for r in rows:
        if r["outcome"] == "matched":
            assert r["state"] == "matched"
            assert r["job_kind"] == r["kind"]
            # never a job of another user
            if r["user_id"] is not None:
                assert r["job_user"] == r["user_id"]
        else:
            # ambiguous (or anything else) is never linked
            assert r["job_id"] is None
            assert r["state"] in ("unresolved", "unmatched")
    _check_prompt_only_matches(jobs_before, rows)
    _check_time_order(rows)


def _check_prompt_only_matches(jobs_before: list[Any], rows: list[Any]) -> None:
    """A userless match is either the one candidate left with its prompt for the one orphan
    left carrying it (`prompt_only`: every other candidate in its window, and every other
    orphan with its prompt, went to another orphan or job in the same run), or one of the
    candidates of the one user every candidate left with its prompt belongs to
    (`one_user_prompt`)."""
    window = dt.timedelta(seconds=WINDOW)
    skew = dt.timedelta(seconds=CLOCK_SKEW_SECONDS)
    for r in rows:
        if r["outcome"] != "matched" or r["user_id"] is not None:
            continue
        assert r["rule"] in ("prompt_only", "one_user_prompt")
        taken = {x["job_id"] for x in rows if x is not r and x["job_id"] is not None}
        candidates = [
            j for j in jobs_before
            if j["kind"] == r["kind"] and j["prompt_norm"] == r["prompt_norm"]
            and j["status"] not in ("COMPLETED", "FAILED", "CANCELLED")
            and r["first_seen_at"] - window <= j["created_at"] <= r["first_seen_at"] + skew
            and j["id"] not in taken
        ]
        if r["rule"] == "one_user_prompt":
            assert r["job_id"] in {j["id"] for j in candidates}
            assert {j["user_id"] for j in candidates} == {r["job_user"]}
            continue
        carriers = [x for x in rows if x is not r
                    and x["kind"] == r["kind"] and x["prompt_norm"] == r["prompt_norm"]]
        assert all(x["outcome"] == "matched" for x in carriers)
        assert [j["id"] for j in candidates] == [r["job_id"]]


def _check_time_order(rows: list[Any]) -> None:
    """One user's orphans with one prompt take that user's jobs in the order they came, and
    so do the userless orphans paired with the one user their prompt points to."""
    groups: dict[tuple[str, str, str, str], list[Any]] = {}
    for r in rows:
        if r["outcome"] == "matched" and r["user_id"] is not None:
            groups.setdefault(("named", r["kind"], r["user_id"], r["prompt_norm"]),
                              []).append(r)
        if r["outcome"] == "matched" and r["rule"] == "one_user_prompt":
            groups.setdefault(("one user", r["kind"], r["job_user"], r["prompt_norm"]),
                              []).append(r)
    for members in groups.values():
        by_orphan = sorted(members, key=lambda r: (r["first_seen_at"], r["backend_job_id"]))
        created = [r["job_created_at"] for r in by_orphan]
        assert created == sorted(created)


def test_the_generated_prompts_really_collide_after_normalisation() -> None:
    # the property test is only meaningful if variants meet after normalisation
    assert len({normalize(p) for p in PROMPTS}) == 3
