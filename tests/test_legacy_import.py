"""`sorami-reconcile import-legacy` against a legacy database built from the existing app's
DDL: galleries per user, the old webhook's damage given back or left for review, the source
untouched, a second import a no-op."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway.jobs.kinds import Kind
from gateway.store import Database
from gateway.store.legacy_source import init_sql
from tests.conftest import Databases
from tests.test_reconcile_cli import cli
from tests.tokens import user

T0 = dt.datetime(2026, 11, 20, 9, 0, 0)
FIRST_USER_ID = "cuserdecoy000000000000001"
USERS = [  # (id, clerkId), oldest first: the first one is the decoy the damage sat on
    (FIRST_USER_ID, "user_decoy"),
    ("cuseralice00000000000001", "user_alice"),
    ("cuserbob0000000000000001", "user_bob"),
    ("cusercarol00000000000001", "user_carol"),
]
CLERK = dict(USERS)
PLACEHOLDER = "Image générée depuis le backend"


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


class Legacy:
    """Rows written into the legacy database, with what the test expects of them."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.n = 0
        self.urls: list[str] = []

    def cuid(self) -> str:
        self.n += 1
        return f"cgen{self.n:021d}"

    async def generation(self, kind: str, gid: str, author: str, prompt: str, status: str,
                         created: dt.datetime, *, files: int = 0, progress: int = 0,
                         error: str | None = None, description: str | None = None,
                         dims: tuple[int | None, int | None, str | None] = (1024, 1024,
                                                                           "1024x1024"),
                         ) -> str:
        table = f"{kind}_generations"
        done = created + dt.timedelta(seconds=40) if status == "COMPLETED" else None
        await self.conn.execute(
            f'INSERT INTO {table} (id, prompt, "authorId", status, progress, "errorMessage",'
            f' "createdAt", "updatedAt", "completedAt", "processingTime")'
            f" VALUES ($1, $2, $3, $4::text::\"{kind.title()}JobStatus\", $5, $6, $7, $8, $9,"
            f" $10)",
            gid, prompt, author, status, 100 if status == "COMPLETED" else progress, error,
            created, done or created, done, 38.5 if done else None)
        for i in range(files):
            url = f"https://cdn.example/{kind}/{gid}/{i}.png"
            self.urls.append(url)
            meta = {"description": description} if description else None
            await self.conn.execute(
                f'INSERT INTO {kind}_files (id, "generationId", filename, "s3Key", "fileUrl",'
                f' "fileSize", format, width, height, "aspectRatio", metadata, "createdAt")'
                f" VALUES ($1, $2, $3, $4, $5, 1000, 'PNG', $6, $7, $8, $9::jsonb, $10)",
                f"cfile{gid}{i}", gid, f"{i}.png", f"{kind}/{gid}/{i}.png", url,
                dims[0], dims[1], dims[2], json.dumps(meta) if meta else None,
                done or created)
        return gid

    async def notification(self, nid: str, owner: str, type_: str, generation: str, *,
                           read: bool = False, source: str | None = None) -> None:
        meta: dict[str, Any] = {"generationId": generation}
        if source:
            meta["source"] = source
        await self.conn.execute(
            'INSERT INTO notifications (id, "userId", type, title, message, metadata, read,'
            ' "createdAt") VALUES ($1, $2, $3::text::"NotificationType", $4, $5, $6::jsonb,'
            " $7, $8)",
            nid, owner, type_, "Ready", "Your images are ready", json.dumps(meta), read, T0)


@pytest.fixture
async def legacy_url(databases: Databases) -> AsyncIterator[str]:
    dsn = await databases.create_empty()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(init_sql())
    finally:
        await conn.close()
    try:
        yield dsn
    finally:
        await databases.drop(dsn)


async def build(dsn: str) -> dict[str, Any]:
    """Every case of the brief; returns the ids the assertions look for."""
    conn = await asyncpg.connect(dsn)
    try:
        for i, (uid, clerk) in enumerate(USERS):
            await conn.execute(
                'INSERT INTO users (id, "clerkId", email, "createdAt", "updatedAt")'
                " VALUES ($1, $2, $3, $4, $4)", uid, clerk, f"{clerk}@example.com",
                T0 - dt.timedelta(days=30 - i))
        lg = Legacy(conn)
        decoy, alice, bob, carol = (u for u, _ in USERS)
        ids: dict[str, Any] = {}
        # the decoy's own image, completed and read
        ids["decoy_own"] = await lg.generation("image", lg.cuid(), decoy, "decoy sunset",
                                               "COMPLETED", at(0), files=1)
        await lg.notification("cnotdecoy", decoy, "IMAGE_COMPLETED", ids["decoy_own"],
                              read=True)
        # alice: completed (one file's size only in aspectRatio), failed video, stuck fox
        ids["alice_done"] = await lg.generation("image", lg.cuid(), alice, "a castle",
                                                "COMPLETED", at(1), files=2,
                                                dims=(None, None, "1024x768"))
        await lg.notification("cnotalice1", alice, "IMAGE_COMPLETED", ids["alice_done"])
        ids["alice_failed"] = await lg.generation("video", lg.cuid(), alice, "a river",
                                                  "FAILED", at(2), error="quota exceeded")
        await lg.notification("cnotalice2", alice, "VIDEO_FAILED", ids["alice_failed"],
                              read=True)
        ids["alice_fox"] = await lg.generation("image", lg.cuid(), alice, "red fox",
                                               "PENDING", at(10))
        ids["fox_uuid"] = await lg.generation(
            "image", "c76c36ee-838d-4ecb-94ed-37018032c9fd", decoy, "red fox", "COMPLETED",
            at(10.5), files=2, description="red fox")
        await lg.notification("cnotfox", decoy, "IMAGE_COMPLETED", ids["fox_uuid"],
                              source="backend-direct")
        # alice twice with one prompt: both given back to her, in time order
        ids["alice_whale1"] = await lg.generation("image", lg.cuid(), alice, "blue whale",
                                                  "PENDING", at(20))
        ids["whale_uuid1"] = await lg.generation(
            "image", "0a1b2c3d-0000-4000-8000-000000000001", decoy, "blue whale",
            "COMPLETED", at(20.5), files=1, description="blue whale")
        ids["alice_whale2"] = await lg.generation("image", lg.cuid(), alice, "blue whale",
                                                  "PROCESSING", at(22))
        ids["whale_uuid2"] = await lg.generation(
            "image", "0a1b2c3d-0000-4000-8000-000000000002", decoy, "blue whale",
            "COMPLETED", at(23), files=1, description="blue whale")
        for n, g in (("cnotwhale1", ids["whale_uuid1"]), ("cnotwhale2", ids["whale_uuid2"])):
            await lg.notification(n, decoy, "IMAGE_COMPLETED", g, source="backend-direct")
        # bob and carol, one prompt at nearly the same time: a tie, left for review
        ids["bob_forest"] = await lg.generation("image", lg.cuid(), bob, "green forest",
                                                "PENDING", at(30))
        ids["carol_forest"] = await lg.generation("image", lg.cuid(), carol, "green forest",
                                                  "PENDING", at(30.1))
        ids["forest_uuid"] = await lg.generation(
            "image", "0a1b2c3d-0000-4000-8000-000000000003", decoy, "green forest",
            "COMPLETED", at(31), files=1, description="green forest")
        await lg.notification("cnotforest", decoy, "IMAGE_COMPLETED", ids["forest_uuid"],
                              source="backend-direct")
        # bob's stuck video, given back
        ids["bob_waves"] = await lg.generation("video", lg.cuid(), bob, "ocean waves",
                                               "PROCESSING", at(40))
        ids["waves_uuid"] = await lg.generation(
            "video", "0a1b2c3d-0000-4000-8000-000000000004", decoy, "ocean waves",
            "COMPLETED", at(41), files=1, description="ocean waves")
        await lg.notification("cnotwaves", decoy, "VIDEO_COMPLETED", ids["waves_uuid"],
                              source="backend-direct")
        # carol's completed video
        ids["carol_video"] = await lg.generation("video", lg.cuid(), carol, "city at night",
                                                 "COMPLETED", at(50), files=1)
        # a backend id with no twin (someone called the backend directly), and a placeholder
        ids["twinless_uuid"] = await lg.generation(
            "image", "0a1b2c3d-0000-4000-8000-000000000005", decoy, "lonely robot",
            "COMPLETED", at(60), files=1, description="lonely robot")
        await lg.notification("cnottwinless", decoy, "IMAGE_COMPLETED",
                              ids["twinless_uuid"], source="backend-direct")
        ids["placeholder_uuid"] = await lg.generation(
            "image", "0a1b2c3d-0000-4000-8000-000000000006", decoy, PLACEHOLDER,
            "COMPLETED", at(61), files=1)
        await lg.notification("cnotplaceholder", decoy, "IMAGE_COMPLETED",
                              ids["placeholder_uuid"], source="backend-direct")
        # bad rows: an author that is gone, a file without dimensions, a status the enum
        # gained after the import was written
        await conn.execute('ALTER TABLE image_generations DROP CONSTRAINT '
                           '"image_generations_authorId_fkey"')
        ids["no_author"] = await lg.generation("image", lg.cuid(), "cusergone", "ghost",
                                               "COMPLETED", at(70), files=1)
        ids["bad_file"] = await lg.generation("image", lg.cuid(), carol, "no size", "COMPLETED",
                                              at(71), files=1, dims=(None, None, "square"))
        await conn.execute("""ALTER TYPE "ImageJobStatus" ADD VALUE 'ARCHIVED'""")
        ids["bad_status"] = await lg.generation("image", lg.cuid(), carol, "archived",
                                                "ARCHIVED", at(72))
        ids["urls"] = lg.urls
        return ids
    finally:
        await conn.close()


CHECKSUM = """
SELECT md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t
"""
TABLES = ("users", "image_generations", "image_files", "video_generations", "video_files",
          "notifications")


async def checksums(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {t: await conn.fetchval(CHECKSUM.format(table=t)) for t in TABLES}
    finally:
        await conn.close()


async def gateway_tables(db: Database) -> dict[str, Any]:
    async with db.connection() as conn:
        return {t: await conn.fetchval(CHECKSUM.format(table=t))
                for t in ("jobs", "job_files", "job_events", "notifications", "orphans",
                          "orphan_events", "legacy_generations", "outbox")}


async def gallery(client: TestClient[Any, Any], kind: str, clerk: str) -> dict[str, Any]:
    page = await client.get(f"/api/{kind}s/user?limit=100", headers=user(clerk))
    assert page.status == 200, await page.text()
    body: dict[str, Any] = await page.json()
    return {g["job_id"]: g for g in body["generations"]}


async def test_import_then_run_puts_every_file_on_the_user_who_asked_for_it(
    legacy_url: str, database_url: str, db: Database, client: TestClient[Any, Any]
) -> None:
    ids = await build(legacy_url)
    before = await checksums(legacy_url)

    done = await cli(database_url, "import-legacy", "--from", legacy_url, "--json")
    assert done.code == 0, done.err
    imported = done.json()
    assert imported["kinds"]["image"]["misattributed"] == 6
    assert imported["kinds"]["video"]["misattributed"] == 1
    skipped = {(s["table"], s["id"]) for s in imported["skipped"]}
    assert skipped == {("image_generations", ids["no_author"]),
                       ("image_files", f"cfile{ids['bad_file']}0"),
                       ("image_generations", ids["bad_status"])}
    assert imported["notifications_withheld"] == 7

    ran = await cli(database_url, "run", "--json")
    assert ran.code == 0, ran.err

    images = {c: await gallery(client, "image", c) for c in CLERK.values()}
    videos = {c: await gallery(client, "video", c) for c in CLERK.values()}
    # the decoy holds only their own
    assert set(images["user_decoy"]) == {ids["decoy_own"]}
    assert videos["user_decoy"] == {}
    assert set(images["user_alice"]) == {ids["alice_done"], ids["alice_fox"],
                                         ids["alice_whale1"], ids["alice_whale2"]}
    assert set(videos["user_alice"]) == {ids["alice_failed"]}
    assert set(images["user_bob"]) == {ids["bob_forest"]}
    assert set(videos["user_bob"]) == {ids["bob_waves"]}
    assert set(images["user_carol"]) == {ids["carol_forest"], ids["bad_file"]}
    assert set(videos["user_carol"]) == {ids["carol_video"]}
    # newest first, as the app sorted them
    assert list(images["user_alice"]) == [ids["alice_whale2"], ids["alice_whale1"],
                                          ids["alice_fox"], ids["alice_done"]]

    def urls(job: dict[str, Any], key: str = "images") -> list[str]:
        return [f["url"] for f in job[key]]

    alice = images["user_alice"]
    assert alice[ids["alice_done"]]["images"][0]["height"] == 768
    assert alice[ids["alice_fox"]]["status"] == "COMPLETED"
    assert urls(alice[ids["alice_fox"]]) == [
        f"https://cdn.example/image/{ids['fox_uuid']}/{i}.png" for i in range(2)]
    assert urls(alice[ids["alice_whale1"]]) == [
        f"https://cdn.example/image/{ids['whale_uuid1']}/0.png"]
    assert urls(alice[ids["alice_whale2"]]) == [
        f"https://cdn.example/image/{ids['whale_uuid2']}/0.png"]
    assert urls(videos["user_bob"][ids["bob_waves"]], "videos") == [
        f"https://cdn.example/video/{ids['waves_uuid']}/0.png"]
    assert videos["user_alice"][ids["alice_failed"]]["status"] == "FAILED"
    assert images["user_bob"][ids["bob_forest"]]["status"] != "COMPLETED"

    # the legacy id answers on the client routes
    status = await client.get(f"/api/images/{ids['alice_done']}/status",
                              headers=user("user_alice"))
    assert status.status == 200
    other = await client.get(f"/api/images/{ids['alice_done']}/status",
                             headers=user("user_bob"))
    assert other.status == 404
    result = await client.get(f"/api/images/{ids['alice_done']}/result",
                              headers=user("user_alice"))
    assert result.status == 200
    # bob's stuck tie job was timed out by the run: cancel finds it by its legacy id
    cancelled = await client.post(f"/api/images/{ids['bob_forest']}/cancel",
                                  headers=user("user_bob"))
    assert cancelled.status == 409
    assert "TIMED_OUT" in await cancelled.text()
    foreign = await client.post(f"/api/images/{ids['bob_forest']}/cancel",
                                headers=user("user_carol"))
    assert foreign.status == 404
    # the gallery pages through the legacy ids with its cursor, newest first
    paged, cursor = [], None
    while True:
        query = "limit=1" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/api/images/user?{query}",
                                       headers=user("user_alice"))).json()
        paged += [g["job_id"] for g in page["generations"]]
        if not (cursor := page["next_cursor"]):
            break
    assert paged == list(images["user_alice"])

    # the decoy is told only of their own image; alice of hers, read flags kept
    notes = await client.get("/api/notifications?limit=100", headers=user("user_decoy"))
    decoy_notes = (await notes.json())["notifications"]
    assert [(n["job_id"], n["read"]) for n in decoy_notes] == [(ids["decoy_own"], True)]
    notes = await client.get("/api/notifications?limit=100", headers=user("user_alice"))
    alice_notes = {(n["job_id"], n["type"], n["read"])
                   for n in (await notes.json())["notifications"]}
    assert {(ids["alice_done"], "IMAGE_COMPLETED", False),
            (ids["alice_failed"], "VIDEO_FAILED", True)} <= alice_notes
    # one notification per job given back
    assert sum(1 for n in alice_notes if n[0] == ids["alice_fox"]) == 1

    # what is left for review, with reasons
    listed = await cli(database_url, "orphans", "--json")
    assert listed.code == 0, listed.err
    open_ = {o["backend_job_id"]: o for o in listed.json()}
    assert set(open_) == {ids["forest_uuid"], ids["twinless_uuid"], ids["placeholder_uuid"]}
    reasons = {k: o["last_decision"]["evidence"]["reason"] for k, o in open_.items()}
    assert "several jobs" in reasons[ids["forest_uuid"]]
    assert "no job" in reasons[ids["twinless_uuid"]]
    assert "no prompt" in reasons[ids["placeholder_uuid"]]

    # every legacy file readable is in the gateway exactly once, on a job or an orphan
    async with db.connection() as conn:
        on_jobs = [r["url"] for r in await conn.fetch("SELECT url FROM job_files")]
        on_orphans = [f["url"] for r in await conn.fetch(
            "SELECT e.payload FROM orphan_events e JOIN orphans o USING (kind, backend_job_id)"
            " WHERE o.state IN ('unresolved', 'unmatched')")
            for f in r["payload"]["data"].get("images", []) + r["payload"]["data"].get(
                "videos", [])]
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    readable = [u for u in ids["urls"] if ids["no_author"] not in u
                and ids["bad_file"] not in u]
    assert sorted(on_jobs + on_orphans) == sorted(readable)

    # the source is untouched, and importing again changes nothing
    assert await checksums(legacy_url) == before
    mark = await gateway_tables(db)
    again = await cli(database_url, "import-legacy", "--from", legacy_url, "--json")
    assert again.code == 0, again.err
    assert again.json()["kinds"]["image"]["jobs"] == 0
    assert again.json()["notifications"] == 0
    repairs = {r["backend_job_id"]: r for r in again.json()["repairs"]}
    assert len(repairs) == 7
    fox = repairs[ids["fox_uuid"]]
    assert (fox["taken_from"], fox["given_to"], fox["job_id"]) == (
        "user_decoy", "user_alice", ids["alice_fox"])
    assert repairs[ids["waves_uuid"]]["given_to"] == "user_bob"
    forest = repairs[ids["forest_uuid"]]
    assert forest["given_to"] is None
    assert "several jobs" in forest["reason"]
    assert await gateway_tables(db) == mark


async def test_the_source_statements_fit_the_existing_apps_schema(legacy_url: str) -> None:
    from gateway.jobs.kinds import Kind
    from gateway.store import legacy_source

    statements = [v for k, v in vars(legacy_source).items() if k.isupper()
                  and isinstance(v, str) and v.lstrip().startswith("SELECT")]
    statements += [q(k) for k in Kind for q in (legacy_source.generations_query,
                                                 legacy_source.files_query)]
    conn = await asyncpg.connect(legacy_url)
    try:
        assert await legacy_source.missing_columns(conn) == []
        for statement in statements:
            await conn.prepare(statement)
    finally:
        await conn.close()


async def test_a_dry_run_reports_the_import_and_writes_nothing(
    legacy_url: str, database_url: str, db: Database
) -> None:
    await build(legacy_url)
    before = await gateway_tables(db)
    done = await cli(database_url, "import-legacy", "--from", legacy_url, "--dry-run",
                     "--json")
    assert done.code == 0, done.err
    report = done.json()
    assert report["dry_run"] is True
    assert report["kinds"]["image"] == {"jobs": 8, "files": 3, "misattributed": 6,
                                        "updated": 0, "already_imported": 0}
    assert report["kinds"]["video"]["jobs"] == 3
    assert len(report["skipped"]) == 3
    assert await gateway_tables(db) == before
    text = await cli(database_url, "import-legacy", "--from", legacy_url, "--dry-run")
    assert text.code == 0
    assert "dry run: nothing was written" in text.out
    assert "image_generations " in text.out
    assert "not found" in text.out


async def test_rows_written_since_are_imported_and_a_late_completion_moves_its_job_on(
    legacy_url: str, database_url: str, client: TestClient[Any, Any]
) -> None:
    ids = await build(legacy_url)
    assert (await cli(database_url, "import-legacy", "--from", legacy_url)).code == 0
    conn = await asyncpg.connect(legacy_url)
    try:
        lg = Legacy(conn)
        lg.n = 900
        fresh = await lg.generation("image", lg.cuid(), "cusercarol00000000000001",
                                    "new after cut-over", "COMPLETED", at(90), files=1)
        # the app completed carol's stuck forest job meanwhile, and regressed nothing
        await conn.execute(
            "UPDATE image_generations SET status = 'COMPLETED', progress = 100,"
            ' "completedAt" = $2, "updatedAt" = $2 WHERE id = $1', ids["carol_forest"], at(95))
        await conn.execute(
            'INSERT INTO image_files (id, "generationId", filename, "s3Key", "fileUrl",'
            ' "fileSize", format, width, height, "createdAt") VALUES'
            " ('cfilelate', $1, 'late.png', 'late.png', 'https://cdn.example/late.png', 1,"
            " 'PNG', 512, 512, $2)", ids["carol_forest"], at(95))
        # and a completed row going back to PENDING must not move its job back
        await conn.execute("""UPDATE video_generations SET status = 'PENDING',
                              "updatedAt" = $2 WHERE id = $1""", ids["carol_video"], at(96))
    finally:
        await conn.close()
    again = await cli(database_url, "import-legacy", "--from", legacy_url, "--json")
    assert again.code == 0, again.err
    assert again.json()["kinds"]["image"]["jobs"] == 1
    assert again.json()["kinds"]["image"]["updated"] == 1
    assert again.json()["kinds"]["video"]["updated"] == 0
    carol = await gallery(client, "image", "user_carol")
    assert fresh in carol
    assert carol[ids["carol_forest"]]["status"] == "COMPLETED"
    assert [f["url"] for f in carol[ids["carol_forest"]]["images"]] == [
        "https://cdn.example/late.png"]
    videos = await gallery(client, "video", "user_carol")
    assert videos[ids["carol_video"]]["status"] == "COMPLETED"


async def test_a_source_that_is_not_the_apps_schema_exits_1_naming_what_is_missing(
    legacy_url: str, database_url: str
) -> None:
    conn = await asyncpg.connect(legacy_url)
    try:
        await conn.execute('ALTER TABLE image_files DROP COLUMN "s3Key"')
    finally:
        await conn.close()
    done = await cli(database_url, "import-legacy", "--from", legacy_url)
    assert done.code == 1
    assert "image_files.s3Key" in done.err


async def test_an_unreachable_source_exits_1_and_a_bad_flag_exits_2(database_url: str) -> None:
    done = await cli(database_url, "import-legacy", "--from",
                     "postgresql://postgres@127.0.0.1:1/nowhere")
    assert done.code == 1
    assert "cannot be reached" in done.err
    missing = await cli(database_url, "import-legacy")
    assert missing.code == 2
    assert "--from" in missing.err
    unknown = await cli(database_url, "import-legacy", "--from", "x", "--fast")
    assert unknown.code == 2


async def test_an_interrupted_import_is_completed_by_running_it_again(
    legacy_url: str, db: Database
) -> None:
    from gateway.usecases.legacy_import import import_legacy

    await build(legacy_url)

    class Interrupted(Exception):
        pass

    def stop_after_three_batches(table: str, rows: int, seen: list[int] = []) -> None:  # noqa: B006
        seen.append(rows)
        if len(seen) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        await import_legacy(legacy_url, db, batch_size=3, progress=stop_after_three_batches)
    async with db.connection() as conn:
        partial = await conn.fetchval("SELECT count(*) FROM jobs")
    # batches of three in id order: the six image orphans' UUIDs sort first, then three jobs
    assert partial == 3

    report = await import_legacy(legacy_url, db, batch_size=3)

    async with db.connection() as conn:
        counts = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM jobs) AS jobs, (SELECT count(*) FROM orphans)"
            " AS orphans, (SELECT count(*) FROM notifications) AS notifications,"
            " (SELECT count(*) FROM job_files) AS files")
    assert dict(counts) == {"jobs": 11, "orphans": 7, "notifications": 3, "files": 4}
    assert report.kinds[Kind.IMAGE].already_imported == 9
