"""The review console's HTML pages (`/review`): server-rendered, autoescaped templates.

Reading works without JavaScript; the actions are plain form posts carrying the CSRF token
bound to the session cookie, answered with a redirect back to the list. Every page forbids
framing and inline scripts.
"""

from __future__ import annotations

import datetime as dt
import difflib
from importlib import resources
from typing import Any, Final
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from gateway.api.schemas import decode_query
from gateway.database import get_database
from gateway.errors import BadRequest, ProblemError
from gateway.review import queue
from gateway.review.access import CSRF_FIELD, acting_operator, csrf_token, operator, session_token
from gateway.review.api import orphan_key

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src * data:; media-src *; style-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_ENV: Final = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.review", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def _age(first_seen_at: dt.datetime) -> str:
    seconds = int((dt.datetime.now(dt.UTC) - first_seen_at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def prompt_diff(orphan_prompt: str | None, candidate: str) -> list[tuple[str, str]]:
    """The candidate's prompt as (op, words): `same`, `ins` (only in the candidate), `del`
    (only in the orphan's prompt), so a page can highlight the differences."""
    if not orphan_prompt:
        return [("same", candidate)]
    theirs, ours = orphan_prompt.split(), candidate.split()
    parts: list[tuple[str, str]] = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(a=theirs, b=ours).get_opcodes():
        if op == "equal":
            parts.append(("same", " ".join(ours[b1:b2])))
            continue
        if a2 > a1:
            parts.append(("del", " ".join(theirs[a1:a2])))
        if b2 > b1:
            parts.append(("ins", " ".join(ours[b1:b2])))
    return parts


_ENV.filters["age"] = _age


def _page(template: str, status: int = 200, **context: Any) -> web.Response:
    html = _ENV.get_template(template).render(**context)
    return web.Response(text=html, status=status, content_type="text/html",
                        headers=SECURITY_HEADERS)


def _csrf(request: web.Request) -> str | None:
    token = session_token(request)
    return csrf_token(token) if token else None


async def list_page(request: web.Request) -> web.StreamResponse:
    principal = await operator(request)
    query = decode_query(dict(request.query), queue.ReviewQuery)
    result = await queue.page(get_database(request.app), query)
    filters = {k: v for k, v in (("kind", query.kind.value if query.kind else None),
                                  ("user_id", query.user_id), ("q", query.q)) if v}
    next_url = (f"/review?{urlencode({**filters, 'cursor': result.next_cursor})}"
                if result.next_cursor else None)
    return _page("list.html", page=result, filters=filters, next_url=next_url,
                 operator=principal.user_id, csrf=_csrf(request),
                 notice=request.query.get("notice"))


async def detail_page(request: web.Request) -> web.StreamResponse:
    principal = await operator(request)
    kind, backend_job_id = orphan_key(request)
    view = await queue.orphan(get_database(request.app), kind, backend_job_id)
    prompt = view.hints["prompt"]
    diffs = {c["job_id"]: prompt_diff(prompt, c["prompt"]) for c in view.candidates}
    return _page("detail.html", view=view, diffs=diffs, operator=principal.user_id,
                 csrf=_csrf(request), action_base=f"/review/{kind.value}/{backend_job_id}")


async def _form(request: web.Request) -> dict[str, str]:
    try:
        fields = await request.post()
    except ValueError:  # a multipart type without its boundary, a body that is no form
        raise BadRequest("The body is not a form.") from None
    return {k: v for k, v in fields.items() if isinstance(v, str)}


def _back(notice: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/review?{urlencode({'notice': notice})}",
                            headers=SECURITY_HEADERS)


async def _decide(request: web.Request, action: str) -> web.StreamResponse:
    # a bearer caller is known before its body is read; a cookie's token is in the form
    principal = (await acting_operator(request, None)
                 if session_token(request) is None else None)
    form = await _form(request)
    principal = principal or await acting_operator(request, form.get(CSRF_FIELD))
    kind, backend_job_id = orphan_key(request)
    db = get_database(request.app)
    try:
        if action == "assign":
            body = queue.AssignBody(job_id=form.get("job_id", ""),
                                    reason=form.get("reason", ""),
                                    allow_other_user=form.get("allow_other_user") == "on")
            done = await queue.assign(db, kind, backend_job_id, body, principal.user_id)
            notice = f"assigned {kind.value} orphan {backend_job_id} to job {done.job_id}"
        else:
            await queue.dismiss(db, kind, backend_job_id, form.get("reason", ""),
                                principal.user_id)
            notice = f"dismissed {kind.value} orphan {backend_job_id}"
    except ProblemError as exc:
        return _page("refused.html", status=exc.status, message=exc.message,
                     back=f"/review/{kind.value}/{backend_job_id}")
    raise _back(notice)


async def assign(request: web.Request) -> web.StreamResponse:
    return await _decide(request, "assign")


async def dismiss(request: web.Request) -> web.StreamResponse:
    return await _decide(request, "dismiss")


_CSS: Final = resources.files("gateway.review").joinpath("templates/console.css").read_bytes()


async def stylesheet(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_CSS, content_type="text/css",
                        headers={"Cache-Control": "max-age=300",
                                 "X-Content-Type-Options": "nosniff"})
