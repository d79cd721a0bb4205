"""Crash: one of three gateway processes is SIGKILLed five times during a run of 2,000 signed
webhooks, each time while it has requests in flight, and started again on its port. The
sender retries every webhook (on the next process) until it is answered 2xx, as the
generator backend does. Every webhook has exactly one effect, whichever try made it, and
nothing answered 2xx is missing.

A try that the kill cut off either committed (its retry is answered `duplicate`: the answer
was lost, the effect was not) or was rolled back with the killed process's connection (its
retry applies it).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter

import aiohttp

from gateway.store import Database
from tests.backend import eventually
from tests.reliability.conftest import Figures
from tests.reliability.sender import Answer, Gateways, Sender, insert_jobs, make_jobs
from tests.reliability.sender import webhooks_of as make_webhooks

PROCESSES = 3
SENDERS = 50
JOBS = 500  # four webhooks each
WEBHOOKS = 2_000
KILLS = 5
VICTIM = 0  # the process that is killed, by index
# answers the victim gives after each start before it is killed: the kill lands mid-run
ANSWERS_BEFORE_KILL = 30
RUN_DEADLINE = 240.0


async def test_sigkill_one_process_5_times_during_2000_webhooks_every_one_has_one_effect(
    database_url: str, db: Database, figures: Figures
) -> None:
    jobs = make_jobs(JOBS, "crash")
    await insert_jobs(db, jobs)
    per_job = [make_webhooks(job) for job in jobs]
    assert sum(map(len, per_job)) == WEBHOOKS
    # jobs are handed out in KILLS + 1 phases; phase k opens once the k-th kill is done and
    # the victim serves again, so that every kill falls inside the run whatever its speed
    phase_of = [n * (KILLS + 1) // JOBS for n in range(JOBS)]
    opened = [asyncio.Event() for _ in range(KILLS + 1)]
    opened[0].set()

    gateways = Gateways(database_url, PROCESSES)
    victim_port = gateways.ports[VICTIM]
    answers: list[Answer] = []
    in_flight_at_kill: list[int] = []
    restart_seconds: list[float] = []
    try:
        await gateways.start_all()
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * SENDERS)
        ) as session:
            sender = Sender(session, gateways.ports, retry=True, deadline=60.0)
            queue = iter(range(JOBS))

            async def report() -> None:
                for n in queue:
                    await opened[phase_of[n]].wait()
                    for step, hook in enumerate(per_job[n]):
                        # the next webhook of a job only after the previous one got its 2xx
                        answer = await sender.send(hook, n + step)
                        answers.append(answer)
                        if not answer.ok:
                            return

            def victim_busy(answered_before: int) -> bool:
                return (sender.answered[victim_port] - answered_before >= ANSWERS_BEFORE_KILL
                        and sender.in_flight[victim_port] > 0)

            async def kill_and_restart() -> None:
                for k in range(1, KILLS + 1):
                    since = sender.answered[victim_port]
                    await sender.wait_until(functools.partial(victim_busy, since), timeout=60)
                    in_flight_at_kill.append(sender.in_flight[victim_port])
                    await gateways.kill(VICTIM)
                    restart_seconds.append(await gateways.restart(VICTIM))
                    opened[k].set()

            started = time.monotonic()
            await asyncio.wait_for(
                asyncio.gather(kill_and_restart(), *(report() for _ in range(SENDERS))),
                timeout=RUN_DEADLINE)
            wall = time.monotonic() - started
    finally:
        stopped = gateways.stop_all()

    outcomes = Counter((a.status, a.outcome) for a in answers)
    tries = sum(a.tries for a in answers)
    fives = sum(n for status, n in sender.statuses.items() if status >= 500)
    dedupe = dict(await db.fetch(
        "SELECT outcome, count(*) FROM webhook_deliveries GROUP BY outcome"))
    applied_keys = {r["dedupe_key"] for r in await db.fetch(
        "SELECT dedupe_key FROM webhook_deliveries WHERE outcome = 'applied'")}
    effects = await db.fetchval("SELECT count(*) FROM job_events WHERE source = 'webhook'")
    missing = sum(1 for a in answers if a.ok and a.webhook.dedupe_key not in applied_keys)
    lost = sum(1 for hooks in per_job for hook in hooks if hook.dedupe_key not in applied_keys)
    delivery_seconds = sorted(a.seconds for a in answers)

    figures["gateway processes"] = PROCESSES
    figures["senders"] = SENDERS
    figures["webhooks"] = WEBHOOKS
    figures["kills (SIGKILL)"] = len(gateways.killed)
    figures["requests in flight at each kill"] = ", ".join(map(str, in_flight_at_kill))
    figures["restart to ready s (max)"] = max(restart_seconds, default=0.0)
    figures["HTTP tries"] = tries
    figures["retries"] = tries - len(answers)
    figures["webhooks retried"] = sum(1 for a in answers if a.tries > 1)
    for name, count in sorted(sender.errors.items()):
        figures[f"tries without answer: {name}"] = count
    for (status, outcome), count in sorted(outcomes.items(), key=str):
        figures[f"final answers {status} {outcome}"] = count
    figures["answers lost to a kill, effect kept (duplicate on retry)"] = outcomes[
        (200, "duplicate")]
    figures["5xx"] = fives
    figures["effects (job_events from webhooks)"] = effects
    figures["dedupe rows"] = sum(dedupe.values())
    figures["answered 2xx but missing"] = missing
    figures["lost"] = lost
    figures["gateway peak RSS MB (max)"] = max(gateways.peak_rss_mb, default=0.0)
    figures["wall time s"] = wall
    figures["rate webhooks/s"] = WEBHOOKS / wall
    figures["latency per try p50 ms"] = sender.percentile_ms(0.5)
    figures["latency per try p99 ms"] = sender.percentile_ms(0.99)
    figures["delivery incl. retries p99 s"] = delivery_seconds[
        round(0.99 * (len(delivery_seconds) - 1))] if delivery_seconds else 0.0
    figures["delivery incl. retries max s"] = delivery_seconds[-1] if delivery_seconds else 0.0

    # the run: five kills, each with requests in flight, and every webhook answered 2xx
    assert len(gateways.killed) == KILLS
    assert all(proc.popen.returncode == -9 for proc in gateways.killed)
    assert len(in_flight_at_kill) == KILLS
    assert min(in_flight_at_kill) > 0
    assert len(answers) == WEBHOOKS, [a.failures for a in answers if not a.ok][:5]
    assert all(a.ok for a in answers), [a.failures for a in answers if not a.ok][:5]
    assert sum(sender.errors.values()) >= KILLS  # the kills cut requests off
    assert fives == 0, sender.statuses
    assert set(outcomes) <= {(200, "applied"), (200, "duplicate")}, outcomes
    for code, stderr in stopped:
        assert code == 0, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-4000:]

    # exactly one effect per webhook, and everything answered 2xx is there
    assert missing == 0
    assert lost == 0
    assert dedupe == {"applied": WEBHOOKS}
    assert applied_keys == {hook.dedupe_key for hooks in per_job for hook in hooks}
    assert effects == WEBHOOKS
    histories = await db.fetch(
        """
        SELECT job_id, array_agg(status::text ORDER BY seq) AS statuses,
               array_agg(seq ORDER BY seq) AS seqs
        FROM job_events WHERE source = 'webhook' GROUP BY job_id
        """)
    assert {r["job_id"]: list(r["statuses"]) for r in histories} == {
        job.id: ["INITIALIZING", "GENERATING", "SAVING", job.final_status] for job in jobs}
    assert all(list(r["seqs"]) == [2, 3, 4, 5] for r in histories)
    finals = {r["id"]: (r["status"], r["seq"], r["files"]) for r in await db.fetch(
        """
        SELECT j.id, j.status::text AS status, j.seq,
               (SELECT count(*) FROM job_files f WHERE f.job_id = j.id) AS files
        FROM jobs j
        """)}
    assert finals == {job.id: (job.final_status, 5, job.files) for job in jobs}
    assert dict(await db.fetch(
        "SELECT type, count(*) FROM notifications GROUP BY type")) == dict(
        Counter(job.notification_type for job in jobs))
    assert await db.fetchval("SELECT count(DISTINCT job_id) FROM notifications") == JOBS
    assert await db.fetchval("SELECT count(*) FROM orphans") == 0

    # the killed processes left no session behind, so no open transaction nor lock: once
    # every process stopped, only this test's own pool (at most 3) is connected
    async def only_ours_left() -> bool:
        rows = await db.fetch(
            "SELECT state FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")
        return len(rows) <= 2 and all(r["state"] == "idle" for r in rows)

    await eventually(only_ours_left, timeout=10, every=0.1)
