"""Retention of the reconciler's audit trail: `reconcile_decisions` and `reconcile_runs`.

Old rows that change nothing are pruned in batches; every decision that changed an
orphan's state (the proof of a link, an operator's reason, an expiry) and the latest
decision of an open orphan are kept whatever their age. Real PostgreSQL, histories
written by real passes (helpers of tests/test_reconcile.py) or, for the batch bounds,
inserted directly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.settings import Settings, SettingsError
from gateway.store import Database, retention
from gateway.usecases import operators
from reconcile.runner import RunOptions
from tests.factories import insert_job
from tests.test_reconcile import decisions, payload, reconcile, record_orphan
from tests.test_reconcile_cli import cli

DAY = 86400.0


async def age_history(db: Database, days: float) -> None:
    """Move every decision and run `days` into the past, as if written then."""
    await db.execute(
        "UPDATE reconcile_decisions SET created_at = created_at - make_interval(days => $1)",
        days)
    await db.execute(
        "UPDATE reconcile_runs SET started_at = started_at - make_interval(days => $1),"
        " finished_at = finished_at - make_interval(days => $1)", days)


async def outcomes(db: Database, backend_job_id: str) -> list[str]:
    return [d["outcome"] for d in await decisions(db, backend_job_id)]


async def history(db: Database, database_url: str) -> dict[str, str]:
    """The situation of the module's test: A matched by a pass, B assigned and C dismissed
    by an operator, D left open (ambiguous), E expired (unmatched). Four real passes and
    a dry run; returns the jobs."""
    job_a = await insert_job(db, user_id="user_a", prompt="a cat", created_ago_seconds=300)
    job_b = await insert_job(db, user_id="user_b", prompt="a red fox", created_ago_seconds=300)
    await insert_job(db, user_id="user_c", prompt="a red fox", created_ago_seconds=300)
    await insert_job(db, user_id="user_d", prompt="a blue bird", created_ago_seconds=300)
    await insert_job(db, user_id="user_e", prompt="a blue bird", created_ago_seconds=300)
    await record_orphan(db, payload("bk-a", user_id="user_a", prompt="a cat"), seen_ago=120)
    await record_orphan(db, payload("bk-b", prompt="a red fox"), seen_ago=120)
    await record_orphan(db, payload("bk-c", user_id="user_c", prompt="a green fish"),
                        seen_ago=120)
    await record_orphan(db, payload("bk-d", prompt="a blue bird"), seen_ago=120)
    await record_orphan(db, payload("bk-e", user_id="user_e", prompt="a lost dog"),
                        seen_ago=2 * DAY)

    await reconcile(database_url, grace_seconds=3600)  # A-D wait; E expires
    await reconcile(database_url)  # A matched, B and D ambiguous, C no candidate
    await operators.assign(db, "bk-b", job_b, reason="user_b confirmed by mail")
    await operators.dismiss(db, "bk-c", reason="a test call from the backend team")
    await reconcile(database_url)  # D ambiguous again
    await reconcile(database_url, dry_run=True)
    return {"a": job_a, "b": job_b}


async def test_old_audit_rows_go_and_the_proof_of_every_link_stays(
    db: Database, database_url: str
) -> None:
    jobs = await history(db, database_url)
    assert await outcomes(db, "bk-a") == ["waiting", "matched"]
    assert await outcomes(db, "bk-b") == ["waiting", "ambiguous", "assigned"]
    assert await outcomes(db, "bk-c") == ["waiting", "no_candidate", "dismissed"]
    assert await outcomes(db, "bk-d") == ["waiting", "ambiguous", "ambiguous"]
    assert await outcomes(db, "bk-e") == ["expired"]
    await age_history(db, 40)

    first = await reconcile(database_url)  # D ambiguous once more, now

    # 1 + 2 + 2 + 3 decisions; the dry run (no decisions); the third pass is kept for now:
    # it is the latest successful real run while this one is running
    assert first.counts["pruned"]["reconcile_decisions"] == 8
    assert first.counts["pruned"]["reconcile_runs"] == 1
    assert await outcomes(db, "bk-a") == ["matched"]
    assert await outcomes(db, "bk-b") == ["assigned"]
    assert await outcomes(db, "bk-c") == ["dismissed"]
    assert await outcomes(db, "bk-d") == ["ambiguous"]
    assert await outcomes(db, "bk-e") == ["expired"]
    (proof,) = await decisions(db, "bk-a")
    assert (proof["job_id"], proof["rule"], proof["evidence"]["user_id"]) == (
        jobs["a"], "user_prompt", "user_a")
    (assigned,) = await decisions(db, "bk-b")
    assert (assigned["job_id"], assigned["actor"], assigned["reason"]) == (
        jobs["b"], "operator", "user_b confirmed by mail")
    # the runs holding kept decisions stay (the foreign key's cascade would take them)
    runs = [r["id"] for r in await db.fetch("SELECT id FROM reconcile_runs ORDER BY id")]
    # passes 1 and 2 (kept decisions), 3 (the latest success while this one ran), this one
    assert len(runs) == 4
    assert runs[-1] == first.run_id

    second = await reconcile(database_url)

    assert second.counts["pruned"] == {"webhook_deliveries": 0, "outbox": 0,
                                       "reconcile_decisions": 0, "reconcile_runs": 1,
                                       "job_usage_changes": 0}
    assert await db.fetchval("SELECT count(*) FROM reconcile_runs") == 4
    assert await outcomes(db, "bk-d") == ["ambiguous", "ambiguous"]  # both recent


async def test_recent_rows_stay_and_a_dry_run_counts_what_a_run_prunes(
    db: Database, database_url: str
) -> None:
    await history(db, database_url)
    await age_history(db, 20)

    kept = await reconcile(database_url)  # 30 days by default: nothing is old enough

    assert kept.counts["pruned"]["reconcile_decisions"] == 0
    assert kept.counts["pruned"]["reconcile_runs"] == 0
    before = await db.fetchval("SELECT count(*) FROM reconcile_decisions")

    dry = await reconcile(database_url, dry_run=True, audit_retention_seconds=10 * DAY)

    assert await db.fetchval("SELECT count(*) FROM reconcile_decisions") == before
    # D's rows of passes 1-3 and its row of `kept` is the latest: 1 + 2 + 2 + 3 in all
    assert dry.counts["pruned"]["reconcile_decisions"] == 8
    # pass 3 (its one decision goes too) and the dry run of `history`
    assert dry.counts["pruned"]["reconcile_runs"] == 2
    real = await reconcile(database_url, audit_retention_seconds=10 * DAY)
    assert real.counts["pruned"]["reconcile_decisions"] == 8
    assert real.counts["pruned"]["reconcile_runs"] == 2


async def test_the_latest_decision_of_an_open_orphan_stays_whatever_its_age(
    db: Database, database_url: str
) -> None:
    await history(db, database_url)
    await record_orphan(db, payload("bk-f", user_id="user_f", prompt="a tree"), seen_ago=2 * DAY)
    await db.execute("UPDATE orphans SET state = 'unmatched' WHERE backend_job_id = 'bk-f'")
    await db.execute(
        "INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, evidence)"
        " VALUES ('image', 'bk-f', 'recheck', 'waiting', '{\"reason\": \"r\"}')")
    # every row is older than the cutoff
    cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)

    async with db.connection() as conn:
        counted = await retention.count_prunable_audit(conn, cutoff)
        pruned = await retention.prune_audit(conn, cutoff)

    assert pruned == counted
    assert await outcomes(db, "bk-a") == ["matched"]
    assert await outcomes(db, "bk-b") == ["assigned"]
    assert await outcomes(db, "bk-c") == ["dismissed"]
    assert await outcomes(db, "bk-d") == ["ambiguous"]  # open: its latest decision
    assert await outcomes(db, "bk-e") == ["expired"]
    assert await outcomes(db, "bk-f") == ["waiting"]  # unmatched: its latest decision
    listed = {o["backend_job_id"]: o["last_outcome"]
              async for o in operators.list_orphans(db, "all")}
    assert listed == {"bk-a": "matched", "bk-b": "assigned", "bk-c": "dismissed",
                      "bk-d": "ambiguous", "bk-e": "expired", "bk-f": "waiting"}


async def test_audit_rows_are_pruned_in_batches_that_continue_past_kept_rows(
    db: Database,
) -> None:
    # three open orphans whose latest decisions are the oldest rows: kept, and a first
    # batch of two finds nothing to delete
    for n in range(3):
        await record_orphan(db, payload(f"open-{n}", user_id="u", prompt=f"p{n}"))
        await db.execute(
            "INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, created_at)"
            " VALUES ('image', $1, 'user_prompt', 'ambiguous', now() - interval '50 days')",
            f"open-{n}")
    # a dismissed orphan with seven old rows, one recent, and its dismissal (kept)
    await record_orphan(db, payload("closed", user_id="u", prompt="q"))
    await db.execute("UPDATE orphans SET state = 'dismissed' WHERE backend_job_id = 'closed'")
    await db.execute(
        "INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, created_at)"
        " SELECT 'image', 'closed', 'user_prompt', 'no_candidate',"
        "        now() - make_interval(days => 40 - g)"
        " FROM generate_series(1, 7) AS g")
    await db.execute(
        "INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, created_at)"
        " VALUES ('image', 'closed', 'user_prompt', 'no_candidate', now() - interval '1 day'),"
        "        ('image', 'closed', 'operator', 'dismissed', now() - interval '45 days')")
    # runs: five old ones without decisions, the latest successful real run (old too), a
    # dry run after it, one still running, one holding a kept decision
    await db.execute(
        "INSERT INTO reconcile_runs (started_at, finished_at, state, dry_run)"
        " SELECT now() - make_interval(days => 60 - g), now() - make_interval(days => 60 - g),"
        "        CASE WHEN g % 2 = 0 THEN 'failed' ELSE 'succeeded' END, false"
        " FROM generate_series(1, 5) AS g")
    latest_success = await db.fetchval(
        "INSERT INTO reconcile_runs (started_at, finished_at, state)"
        " VALUES (now() - interval '50 days', now() - interval '50 days', 'succeeded')"
        " RETURNING id")
    await db.execute(
        "INSERT INTO reconcile_runs (started_at, finished_at, state, dry_run)"
        " VALUES (now() - interval '49 days', now() - interval '49 days', 'succeeded', true)")
    running = await db.fetchval(
        "INSERT INTO reconcile_runs (started_at) VALUES (now() - interval '70 days')"
        " RETURNING id")
    holding = await db.fetchval(
        "INSERT INTO reconcile_runs (started_at, finished_at, state)"
        " VALUES (now() - interval '80 days', now() - interval '80 days', 'failed')"
        " RETURNING id")
    await db.execute("UPDATE reconcile_decisions SET run_id = $1 WHERE outcome = 'dismissed'",
                     holding)
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)

    async with db.connection() as conn:
        counted = await retention.count_prunable_audit(conn, cutoff)
        pruned = await retention.prune_audit(conn, cutoff, batch=2)

    assert pruned == counted == {"reconcile_decisions": 7, "reconcile_runs": 6}
    left = await db.fetch("SELECT backend_job_id, outcome FROM reconcile_decisions"
                          " ORDER BY backend_job_id, id")
    assert [(d["backend_job_id"], d["outcome"]) for d in left] == [
        ("closed", "no_candidate"), ("closed", "dismissed"),
        ("open-0", "ambiguous"), ("open-1", "ambiguous"), ("open-2", "ambiguous")]
    runs = {r["id"] for r in await db.fetch("SELECT id FROM reconcile_runs")}
    assert runs == {latest_success, running, holding}


async def test_the_prune_batches_read_the_partial_index_not_the_whole_table(
    db: Database,
) -> None:
    await db.execute(
        "INSERT INTO reconcile_decisions (kind, backend_job_id, rule, outcome, created_at)"
        " SELECT 'image', 'b-' || (g % 5000), 'user_prompt',"
        "        (ARRAY['waiting', 'ambiguous', 'no_candidate', 'matched'])[g % 4 + 1],"
        "        now() - make_interval(mins => g)"
        " FROM generate_series(1, 40000) AS g")
    await db.execute(
        "INSERT INTO reconcile_runs (started_at, finished_at, state)"
        " SELECT now() - make_interval(mins => 5 * g), now() - make_interval(mins => 5 * g),"
        "        'succeeded' FROM generate_series(1, 20000) AS g")
    await db.execute("ANALYZE reconcile_decisions")
    await db.execute("ANALYZE reconcile_runs")
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=20)
    start = (dt.datetime.min.replace(tzinfo=dt.UTC), 0)

    async with db.connection() as conn:
        for query, table, index in (
            (retention.PRUNE_DECISIONS, "reconcile_decisions", "reconcile_decisions_prunable"),
            (retention.PRUNE_RUNS, "reconcile_runs", "reconcile_runs_finished"),
        ):
            (plan,) = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + query, cutoff, *start, 5000)
            scans = {(node["Node Type"], node.get("Index Name"))
                     for node in plan_nodes(plan["Plan"])
                     if node.get("Relation Name") == table}
            assert ("Index Scan", index) in scans, scans
            assert ("Seq Scan", None) not in scans, scans


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


def test_the_audit_retention_defaults_to_30_days_and_reaches_the_run_options() -> None:
    assert Settings.from_env({}).reconcile_audit_retention_seconds == 30 * 86400
    s = Settings.from_env({"RECONCILE_AUDIT_RETENTION_SECONDS": "7200"})
    assert RunOptions.from_settings(s).audit_retention_seconds == 7200
    assert RunOptions.from_settings(Settings()).audit_retention_seconds == 30 * DAY


@pytest.mark.parametrize("value", ["soon", "1.5", "-1", "0", "3599", "30d"])
def test_a_malformed_audit_retention_names_the_variable(value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"RECONCILE_AUDIT_RETENTION_SECONDS": value})
    assert raised.value.variable == "RECONCILE_AUDIT_RETENTION_SECONDS"


async def test_the_cli_reports_the_audit_rows_pruned_in_json_and_in_words(
    db: Database, database_url: str
) -> None:
    await history(db, database_url)
    await age_history(db, 3)

    dry = await cli(database_url, "run", "--dry-run", "--json",
                    RECONCILE_AUDIT_RETENTION_SECONDS="86400")
    done = await cli(database_url, "run", "--json", RECONCILE_AUDIT_RETENTION_SECONDS="86400")
    words = await cli(database_url, "run", RECONCILE_AUDIT_RETENTION_SECONDS="86400")

    assert (dry.code, done.code, words.code) == (0, 0, 0), (dry.err, done.err, words.err)
    result = done.json()
    assert result["parameters"]["audit_retention_seconds"] == 86400
    # the dry run writes no decision: D's latest (pass 3) is kept, and pass 3 with it
    assert dry.json()["counts"]["pruned"] == {"webhook_deliveries": 0, "outbox": 0,
                                              "reconcile_decisions": 7, "reconcile_runs": 1,
                                              "job_usage_changes": 0}
    # the real run decides about D first: pass 3's row is superseded; pass 3 itself is
    # still the latest successful real run, the dry run of `history` goes
    assert result["counts"]["pruned"] == {"webhook_deliveries": 0, "outbox": 0,
                                          "reconcile_decisions": 8, "reconcile_runs": 1,
                                          "job_usage_changes": 0}
    # and pass 3 goes with the next run
    assert ("pruned             0 webhook deliveries, 0 outbox rows, 0 decisions, 1 runs,"
            " 0 usage changes folded") in (
        words.out)


async def test_a_malformed_audit_retention_exits_2_naming_it() -> None:
    done = await cli(None, "run", RECONCILE_AUDIT_RETENTION_SECONDS="a month")

    assert done.code == 2
    assert done.err.startswith("sorami-reconcile: error: RECONCILE_AUDIT_RETENTION_SECONDS:")
    assert done.out == ""
