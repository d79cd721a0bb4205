"""Load: three gateway processes on one database, 50 concurrent senders, 10,000 signed
webhooks of which 3,000 are duplicates, a third of those sent at the same moment as their
original. Exactly one effect per distinct webhook, none lost, no 5xx.

An effect is what an applied webhook leaves in the database: its dedupe row
(`webhook_deliveries`, outcome `applied`), one `job_events` row (source `webhook`) with the
job's new status, and on the job's last webhook its files and its owner's notification.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict

import aiohttp

from gateway.store import Database
from tests.reliability.conftest import Figures
from tests.reliability.sender import Answer, Gateways, Sender, Webhook, insert_jobs, make_jobs
from tests.reliability.sender import webhooks_of as make_webhooks

PROCESSES = 3
SENDERS = 50
JOBS = 1_750  # four webhooks each
DISTINCT = 7_000
DUPLICATES = 3_000
RUN_DEADLINE = 240.0

# how a duplicate is sent: at the same moment as its original (both in flight together),
# right after the original was answered (a redelivery whose answer was lost), or once the
# sender has reported all its jobs (a late redelivery, the job long finished)
CONCURRENT, AFTER, LATE = "concurrent", "after", "late"


async def test_three_processes_50_senders_10000_webhooks_30_percent_duplicates(
    database_url: str, db: Database, figures: Figures
) -> None:
    rng = random.Random(9_1)
    jobs = make_jobs(JOBS, "load")
    await insert_jobs(db, jobs)
    per_job = {job.id: make_webhooks(job) for job in jobs}
    distinct = [hook for hooks in per_job.values() for hook in hooks]
    assert len(distinct) == DISTINCT
    chosen = rng.sample(distinct, DUPLICATES)
    duplicate_of = {hook.msg_id: mode for mode, part in zip(
        (CONCURRENT, AFTER, LATE), (chosen[0::3], chosen[1::3], chosen[2::3]), strict=True)
        for hook in part}

    gateways = Gateways(database_url, PROCESSES)
    answers: list[tuple[str, Answer]] = []  # (how it was sent, its answer)
    pairs: list[tuple[Answer, Answer]] = []
    try:
        await gateways.start_all()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * SENDERS)
        ) as session:
            sender = Sender(session, gateways.ports, retry=False)

            async def report(senders_jobs: list[int]) -> None:
                late: list[tuple[Webhook, int]] = []
                for n in senders_jobs:
                    for step, hook in enumerate(per_job[jobs[n].id]):
                        target = n + step
                        mode = duplicate_of.get(hook.msg_id)
                        # a duplicate goes to another process than its original
                        if mode == CONCURRENT:
                            first, second = await asyncio.gather(
                                sender.send(hook, target), sender.send(hook, target + 1))
                            answers.extend((("original", first), (CONCURRENT, second)))
                            pairs.append((first, second))
                            continue
                        answers.append(("original", await sender.send(hook, target)))
                        if mode == AFTER:
                            answers.append((AFTER, await sender.send(hook, target + 1)))
                        elif mode == LATE:
                            late.append((hook, target + 1))
                rng_late = random.Random(senders_jobs[0])
                rng_late.shuffle(late)
                for hook, target in late:
                    answers.append((LATE, await sender.send(hook, target)))

            started = time.monotonic()
            await asyncio.wait_for(
                asyncio.gather(*(report(list(range(s, JOBS, SENDERS))) for s in range(SENDERS))),
                timeout=RUN_DEADLINE)
            wall = time.monotonic() - started
    finally:
        stopped = gateways.stop_all()

    by_mode = Counter(mode for mode, _ in answers)
    answered = Counter((a.status, a.outcome) for _, a in answers)
    fives = sum(n for status, n in sender.statuses.items() if status >= 500)
    effects = await db.fetchval("SELECT count(*) FROM job_events WHERE source = 'webhook'")
    dedupe = dict(await db.fetch(
        "SELECT outcome, count(*) FROM webhook_deliveries GROUP BY outcome"))
    applied_keys = {r["dedupe_key"] for r in await db.fetch(
        "SELECT dedupe_key FROM webhook_deliveries WHERE outcome = 'applied'")}
    lost = sum(1 for hook in distinct if hook.dedupe_key not in applied_keys)
    files = await db.fetchval("SELECT count(*) FROM job_files")
    notifications = await db.fetchval("SELECT count(*) FROM notifications")

    figures["gateway processes"] = PROCESSES
    figures["senders"] = SENDERS
    figures["webhooks sent"] = len(answers)
    figures["distinct"] = len(distinct)
    figures["duplicates"] = len(answers) - by_mode["original"]
    figures["duplicates sent with their original"] = by_mode[CONCURRENT]
    figures["duplicates right after"] = by_mode[AFTER]
    figures["duplicates late"] = by_mode[LATE]
    for (status, outcome), count in sorted(answered.items(), key=str):
        figures[f"answers {status} {outcome}"] = count
    figures["connection errors"] = sum(sender.errors.values())
    figures["5xx"] = fives
    figures["effects (job_events from webhooks)"] = effects
    figures["dedupe rows"] = sum(dedupe.values())
    figures["files"] = files
    figures["notifications"] = notifications
    figures["lost"] = lost
    figures["answers by process"] = ", ".join(str(sender.answered[p]) for p in gateways.ports)
    figures["gateway peak RSS MB (max)"] = max(gateways.peak_rss_mb, default=0.0)
    figures["wall time s"] = wall
    figures["rate webhooks/s"] = len(answers) / wall
    figures["latency p50 ms"] = sender.percentile_ms(0.5)
    figures["latency p99 ms"] = sender.percentile_ms(0.99)

    # every request answered, once, without a retry
    assert len(answers) == DISTINCT + DUPLICATES
    assert sum(a.tries for _, a in answers) == DISTINCT + DUPLICATES
    assert not sender.errors, sender.errors
    assert fives == 0
    assert dict(sender.statuses) == {200: DISTINCT + DUPLICATES}, [
        a.failures for _, a in answers if not a.ok][:5]
    # every distinct webhook applied exactly once, every copy of it answered duplicate
    assert answered == {(200, "applied"): DISTINCT, (200, "duplicate"): DUPLICATES}
    outcomes: dict[str, list[str | None]] = defaultdict(list)
    for _, answer in answers:
        outcomes[answer.webhook.msg_id].append(answer.outcome)
    assert all(seen.count("applied") == 1 for seen in outcomes.values())
    assert len(pairs) == by_mode[CONCURRENT] == DUPLICATES // 3
    assert all({a.outcome, b.outcome} == {"applied", "duplicate"} for a, b in pairs)
    for code, stderr in stopped:
        assert code == 0, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-4000:]
    assert all(sender.answered[port] > 0 for port in gateways.ports)

    # the database holds exactly the effects of 7,000 deliveries
    assert lost == 0
    assert dedupe == {"applied": DISTINCT}
    assert applied_keys == {hook.dedupe_key for hook in distinct}
    assert effects == DISTINCT
    histories = await db.fetch(
        """
        SELECT job_id, array_agg(status::text ORDER BY seq) AS statuses,
               array_agg(seq ORDER BY seq) AS seqs
        FROM job_events WHERE source = 'webhook' GROUP BY job_id
        """)
    expected_history = {job.id: ["INITIALIZING", "GENERATING", "SAVING", job.final_status]
                        for job in jobs}
    assert {r["job_id"]: list(r["statuses"]) for r in histories} == expected_history
    assert all(list(r["seqs"]) == [2, 3, 4, 5] for r in histories)
    finals = {r["id"]: (r["status"], r["progress"], r["seq"], r["files"]) for r in await db.fetch(
        """
        SELECT j.id, j.status::text AS status, j.progress, j.seq,
               (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS files
        FROM jobs j
        """)}
    assert finals == {job.id: (job.final_status, 90 if job.fails else 100, 5, job.files)
                      for job in jobs}
    assert files == sum(job.files for job in jobs)
    assert dict(await db.fetch(
        "SELECT type, count(*) FROM notifications GROUP BY type")) == dict(
        Counter(job.notification_type for job in jobs))
    assert await db.fetchval(
        "SELECT count(DISTINCT job_id) FROM notifications") == JOBS
    assert await db.fetchval("SELECT count(*) FROM orphans") == 0
