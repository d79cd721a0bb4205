"""The review console in a real headless Chromium: an operator signed in by the session
cookie sees a tie with the orphan's image, opens it, assigns it by clicking, and dismisses
another; a non-operator is refused. The images are served by a real file server, as the
backend's storage serves them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.settings import Settings
from gateway.simulator.media import prompt_colour, solid_png
from gateway.store import Database
from tests.browser import chromium, require_chromium, screenshot
from tests.factories import insert_job
from tests.test_reconcile import payload, reconcile, record_orphan
from tests.tokens import bearer, hs256_token

Server = Callable[..., Awaitable[TestServer]]
OPERATOR = "op_alice"
PAGE_TIMEOUT_MS = 30_000


async def file_server(aiohttp_server: Server) -> str:
    """Storage for the backend's files: a PNG coloured after its name, at any path."""

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=solid_png(64, 64, prompt_colour(request.path)),
                            content_type="image/png")

    app = web.Application()
    app.router.add_get("/{name:.*}", serve)
    return str((await aiohttp_server(app)).make_url("")).rstrip("/")


@pytest.fixture
async def console(make_settings: Callable[..., Settings], aiohttp_server: Server) -> str:
    require_chromium()
    settings = make_settings(review_operators=(OPERATOR,))
    return str((await aiohttp_server(create_app(settings))).make_url("")).rstrip("/")


async def signed_in(browser: Any, origin: str, user: str) -> Any:
    context = await browser.new_context()
    await context.add_cookies([{"name": "__session", "value": hs256_token(user, ttl=300),
                                "url": origin}])
    return await context.new_page()


async def test_an_operator_assigns_a_tie_and_dismisses_an_orphan_by_clicking(
    console: str, aiohttp_server: Server, db: Database, database_url: str
) -> None:
    files = await file_server(aiohttp_server)
    job_a = await insert_job(db, user_id="user_a", prompt="a red fox in the snow",
                             created_ago_seconds=60)
    await insert_job(db, user_id="user_b", prompt="a red fox in the snow",
                     created_ago_seconds=50)
    body = payload("anon-fox", prompt="a red fox in the snow")
    body["data"]["images"][0]["url"] = f"{files}/anon-fox/1.png"
    tie = await record_orphan(db, body, seen_ago=5)
    stray = payload("stray-1", user_id="user_c", prompt="a backend test image")
    stray["data"]["images"][0]["url"] = f"{files}/stray-1/1.png"
    await record_orphan(db, stray)
    await reconcile(database_url)

    async with chromium() as browser:
        page = await signed_in(browser, console, OPERATOR)
        await page.goto(f"{console}/review")
        row = page.locator(f'tr.orphan[data-backend-job-id="{tie}"]')
        await row.get_by_text("ambiguous").wait_for(timeout=PAGE_TIMEOUT_MS)
        thumb = row.locator("img.thumb")
        await page.wait_for_function("img => img.complete && img.naturalWidth === 64",
                                     arg=await thumb.element_handle(),
                                     timeout=PAGE_TIMEOUT_MS)
        await screenshot(page, "review-list")

        await row.get_by_role("link").click()
        await page.locator("img.large").wait_for(timeout=PAGE_TIMEOUT_MS)
        assert await page.locator("article.candidate").count() == 2
        await screenshot(page, "review-tie")
        mine = page.locator(f'article.candidate[data-job-id="{job_a}"]')
        await mine.get_by_role("button", name=f"Assign to {job_a}").click()
        await page.get_by_role("status").wait_for(timeout=PAGE_TIMEOUT_MS)
        assert f"to job {job_a}" in await page.get_by_role("status").inner_text()
        await screenshot(page, "review-assigned")

        await page.goto(f"{console}/review/image/stray-1")
        await page.get_by_role("button", name="Dismiss").click()
        await page.get_by_role("status").wait_for(timeout=PAGE_TIMEOUT_MS)
        assert await page.locator("tr.orphan").count() == 0
        await screenshot(page, "review-dismissed")

        stranger = await signed_in(browser, console, "user_a")
        refused = await stranger.goto(f"{console}/review")
        assert refused is not None
        assert refused.status == 403
        await screenshot(stranger, "review-forbidden")

    async with (aiohttp.ClientSession(headers=bearer(hs256_token("user_a"))) as owner,
                owner.get(f"{console}/api/images/{job_a}/result") as answer):
        result = await answer.json()
    assert [f["url"] for f in result["images"]] == [f"{files}/anon-fox/1.png"]
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE user_id = 'user_a'") == 1
    audit = await db.fetch("SELECT backend_job_id, outcome, actor FROM reconcile_decisions "
                           "WHERE rule = 'operator' ORDER BY id")
    assert [tuple(r) for r in audit] == [(tie, "assigned", OPERATOR),
                                         ("stray-1", "dismissed", OPERATOR)]
