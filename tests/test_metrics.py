"""GET /metrics: the HTTP histogram by route template, and gauges read from the database."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.jobs.kinds import Kind
from gateway.jobs.prompts import normalize
from gateway.jobs.state import Status
from gateway.metrics.database import DatabaseGauges
from gateway.settings import Settings
from gateway.store import Database, orphans, outbox
from tests.factories import insert_job
from tests.metrics_helpers import Scrape, needs_promtool, promtool_check_metrics
from tests.pg import refusing_connections

Client = TestClient[web.Request, web.Application]
DURATION = "sorami_http_request_duration_seconds_count"


async def scrape(client: Client, **headers: str) -> Scrape:
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200
    return Scrape(await resp.text())


async def started(aiohttp_client: Callable[..., Any], app: web.Application) -> Client:
    client: Client = await aiohttp_client(app)
    return client


async def probe(request: web.Request) -> web.Response:
    return web.json_response({"thing": request.match_info["thing_id"]})


async def explode(request: web.Request) -> web.Response:
    raise RuntimeError("boom")


async def test_metrics_is_prometheus_text_with_process_metrics(client: Client) -> None:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    found = Scrape(await resp.text())
    assert found.value("sorami_database_up") == 1
    assert found.value("process_cpu_seconds_total") is not None
    # the metric objects other code increments are all exposed
    for family in ("sorami_webhooks", "sorami_delivery_attempts", "sorami_jobs_created",
                   "sorami_notifications_created", "sorami_http_request_duration_seconds",
                   "sorami_webhook_processing_seconds", "sorami_job_duration_seconds",
                   "sorami_job_first_webhook_seconds"):
        assert family in found.families


async def test_openmetrics_when_the_scraper_asks_for_it(client: Client) -> None:
    resp = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).endswith("# EOF\n")


async def test_request_duration_is_labelled_by_route_template(
    aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    app.router.add_get("/things/{thing_id}", probe)
    client = await started(aiohttp_client, app)
    labels = {"method": "GET", "route": "/things/{thing_id}", "status_class": "2xx"}
    before = (await scrape(client)).get(DURATION, **labels)
    for thing in ("job-one", "job-two"):
        assert (await client.get(f"/things/{thing}")).status == 200
    after = await scrape(client)
    assert after.get(DURATION, **labels) == before + 2
    routes = after.label_values(DURATION, "route")
    assert not any("job-one" in r or "job-two" in r for r in routes)


async def test_unmatched_paths_share_one_route_label(client: Client) -> None:
    labels = {"method": "GET", "route": "unmatched", "status_class": "4xx"}
    before = (await scrape(client)).get(DURATION, **labels)
    for path in ("/no/such/1", "/no/such/2", "/api/images/x/nothing"):
        assert (await client.get(path)).status == 404
    after = await scrape(client)
    assert after.get(DURATION, **labels) == before + 3
    assert not any("/no/such" in r for r in after.label_values(DURATION, "route"))


async def test_unknown_methods_share_one_method_label(client: Client) -> None:
    labels = {"method": "other", "route": "unmatched", "status_class": "4xx"}
    before = (await scrape(client)).get(DURATION, **labels)
    assert (await client.request("PURGE", "/healthz")).status == 405
    after = await scrape(client)
    assert after.get(DURATION, **labels) == before + 1
    assert "PURGE" not in after.label_values(DURATION, "method")


async def test_unhandled_errors_count_as_5xx(
    aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    app.router.add_get("/explode", explode)
    client = await started(aiohttp_client, app)
    labels = {"method": "GET", "route": "/explode", "status_class": "5xx"}
    before = (await scrape(client)).get(DURATION, **labels)
    assert (await client.get("/explode")).status == 500
    assert (await scrape(client)).get(DURATION, **labels) == before + 1


async def test_jobs_gauge_counts_rows_by_kind_and_status(db: Database, client: Client) -> None:
    await insert_job(db, status=Status.QUEUED)
    await insert_job(db, status=Status.QUEUED, created_ago_seconds=600)
    await insert_job(db, kind=Kind.VIDEO, status=Status.GENERATING)
    await insert_job(db, status=Status.COMPLETED)
    await insert_job(db, kind=Kind.VIDEO, status=Status.FAILED)
    found = await scrape(client)
    expected = {
        ("image", "QUEUED"): 2, ("video", "GENERATING"): 1,
        ("image", "COMPLETED"): 1, ("video", "FAILED"): 1,
    }
    for kind in Kind:
        for status in Status:
            value = found.value("sorami_jobs", kind=kind, status=status)
            assert value == expected.get((kind, status), 0), (kind, status)
    oldest = found.get("sorami_jobs_oldest_update_age_seconds", kind="image", status="QUEUED")
    assert 600 <= oldest < 660
    assert found.value(
        "sorami_jobs_oldest_update_age_seconds", kind="image", status="SAVING"
    ) == 0
    # finished jobs have no "oldest update" series: they are not waiting for anything
    assert found.value(
        "sorami_jobs_oldest_update_age_seconds", kind="image", status="COMPLETED"
    ) is None


async def test_outbox_gauges_count_due_rows_and_the_oldest_wait(
    db: Database, client: Client
) -> None:
    due_late, due_later, delivered = [
        await insert_job(db, status=Status.PENDING) for _ in range(3)
    ]
    async with db.transaction() as conn:
        for job_id in (due_late, due_later, delivered):
            await outbox.enqueue(conn, job_id, "generate", {"prompt": "a cat"})
        await conn.execute(
            "UPDATE outbox SET due_at = now() - interval '700 seconds' WHERE job_id = $1",
            due_late,
        )
        await conn.execute(
            "UPDATE outbox SET due_at = now() + interval '1 hour', attempts = 1 "
            "WHERE job_id = $1",
            due_later,
        )
        await conn.execute(
            "UPDATE outbox SET delivered_at = now(), due_at = now() - interval '2 hours' "
            "WHERE job_id = $1",
            delivered,
        )
    found = await scrape(client)
    assert found.value("sorami_outbox_due") == 1
    assert found.value("sorami_outbox_pending") == 2
    assert 700 <= found.get("sorami_outbox_oldest_due_age_seconds") < 760


async def test_orphan_gauges_count_unresolved_and_unmatched(
    db: Database, client: Client
) -> None:
    hints = orphans.OrphanHints(
        user_id="user_a", prompt="a cat", prompt_norm=normalize("a cat"), file_count=0
    )
    async with db.transaction() as conn:
        for n, backend_id in enumerate(("b-old", "b-new", "b-unmatched", "b-matched")):
            await orphans.lock_backend_id(conn, Kind.IMAGE, backend_id)
            await orphans.record(
                conn, Kind.IMAGE, backend_id, dedupe_key=f"k{n}", event_status="completed",
                payload={"job_id": backend_id, "status": "completed"}, hints=hints,
            )
        await conn.execute(
            "UPDATE orphans SET first_seen_at = now() - interval '1900 seconds' "
            "WHERE backend_job_id = 'b-old'"
        )
        await conn.execute(
            "UPDATE orphans SET state = 'unmatched' WHERE backend_job_id = 'b-unmatched'"
        )
        await conn.execute(
            "UPDATE orphans SET state = 'matched', resolved_at = now(), "
            "first_seen_at = now() - interval '1 day' WHERE backend_job_id = 'b-matched'"
        )
    found = await scrape(client)
    assert found.value("sorami_orphans_unresolved", kind="image") == 3
    assert found.value("sorami_orphans_unresolved", kind="video") == 0
    age = found.get("sorami_orphans_oldest_unresolved_age_seconds", kind="image")
    assert 1900 <= age < 1960
    assert found.value("sorami_orphans_oldest_unresolved_age_seconds", kind="video") == 0
    assert found.value("sorami_orphans_open_by_reason", kind="image", reason="undecided") == 3


async def test_last_successful_reconcile_ignores_failed_and_dry_runs(
    db: Database, aiohttp_client: Callable[..., Any], settings: Settings
) -> None:
    never = await scrape(await started(aiohttp_client, create_app(settings)))
    assert never.value("sorami_reconcile_last_success_timestamp_seconds") == 0

    succeeded = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    for finished, state, dry_run in (
        (succeeded, "succeeded", False),
        (succeeded + dt.timedelta(minutes=5), "failed", False),
        (succeeded + dt.timedelta(minutes=9), "succeeded", True),
    ):
        await db.execute(
            "INSERT INTO reconcile_runs (started_at, finished_at, state, dry_run) "
            "VALUES ($1::timestamptz - interval '10 seconds', $1, $2, $3)",
            finished, state, dry_run,
        )
    fresh = await scrape(await started(aiohttp_client, create_app(settings)))
    assert fresh.value("sorami_reconcile_last_success_timestamp_seconds") == (
        succeeded.timestamp()
    )


async def test_database_gauges_are_cached_for_a_few_seconds(db: Database) -> None:
    now = [1000.0]
    gauges = DatabaseGauges(db, ttl_seconds=5, finished_ttl_seconds=60, clock=lambda: now[0])

    async def jobs(status: str) -> float:
        for family in await gauges.collect():
            for sample in family.samples:
                if sample.name == "sorami_jobs" and sample.labels == {
                    "kind": "image", "status": status
                }:
                    return float(sample.value)
        raise AssertionError("no sorami_jobs sample")

    assert await jobs("QUEUED") == 0
    await insert_job(db, status=Status.QUEUED)
    await insert_job(db, status=Status.COMPLETED)
    now[0] += 4.9
    assert await jobs("QUEUED") == 0  # still the cached figures
    now[0] += 0.2
    assert await jobs("QUEUED") == 1
    assert await jobs("COMPLETED") == 0  # counting finished jobs is refreshed less often
    now[0] += 60
    assert await jobs("COMPLETED") == 1


async def test_metrics_answer_without_the_database(
    database_url: str, db: Database, client: Client
) -> None:
    await insert_job(db, status=Status.QUEUED)
    # the pool is open (the app started); now the database stops taking connections
    async with refusing_connections(database_url):
        found = await scrape(client)
    assert found.value("sorami_database_up") == 0
    assert "sorami_jobs" not in found.families
    assert "sorami_outbox_due" not in found.families
    assert found.value("process_cpu_seconds_total") is not None
    assert "sorami_http_request_duration_seconds" in found.families


@needs_promtool
async def test_a_real_scrape_passes_promtool_check_metrics(
    db: Database, aiohttp_client: Callable[..., Any], app: web.Application
) -> None:
    app.router.add_get("/things/{thing_id}", probe)
    client = await started(aiohttp_client, app)
    await insert_job(db, status=Status.GENERATING)
    await client.get("/things/a")
    await client.get("/nope")
    text = (await scrape(client)).text
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
