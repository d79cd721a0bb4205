"""The review console for operators (`REVIEW_OPERATORS`): its JSON API under `/api/review`
and its HTML pages under `/review`, registered and documented from one table."""

from __future__ import annotations

from aiohttp import web

from gateway.api import Route
from gateway.openapi import (
    NOT_FOUND,
    UNAUTHORIZED,
    UNAVAILABLE,
    Operation,
    Reply,
    problem,
    register,
)
from gateway.review import api, console, queue

__all__ = ["routes", "setup_review"]

FORBIDDEN = problem(403, "Authenticated, but not a review operator; or, with the session "
                         "cookie, an action without the console's CSRF token or from another "
                         "origin")
REFUSED = problem(409, "Refused, nothing changed: the reason `sorami-reconcile` gives (the "
                       "orphan was decided meanwhile, the job is taken, ...)")
BAD_BODY = (problem(400, "The body is not JSON"),
            problem(422, "A field is invalid (a blank `reason`); `field` names it"))
_ORPHAN = "/api/review/orphans/{kind}/{backend_job_id}"
_PAGE = "/review/{kind}/{backend_job_id}"
_ACTION = ("Needs the Authorization header, or the session cookie with the console's CSRF token "
           "(header `X-CSRF-Token`)")


def routes() -> list[Route]:
    tag = "review"
    return [
        Route(Operation(
            "GET", "/api/review/orphans", "reviewOrphans",
            "Open orphans (waiting for review, and unmatched), oldest first", tag,
            bearer=True, query=queue.ReviewQuery,
            description="`q` is normalised as the reconciler normalises prompts; `counts` "
                        "gives how many match the filter, by the latest decision's outcome "
                        "(on the first page; null on the pages after it).",
            replies=(Reply(200, "One page", queue.ReviewPage), UNAUTHORIZED, FORBIDDEN,
                     problem(422, "A bad filter, `limit` or `cursor`"), UNAVAILABLE),
        ), api.list_orphans),
        Route(Operation(
            "POST", "/api/review/orphans/dismiss", "reviewBulkDismiss",
            "Dismiss every open orphan the filter matches", tag, bearer=True,
            body=queue.BulkDismissBody,
            description="Refused with 409 unless the filter matches exactly `count` orphans "
                        f"(at most {queue.BULK_MAX}). " + _ACTION,
            replies=(Reply(200, "How many were dismissed; any decided meanwhile",
                           queue.BulkDismissed), *BAD_BODY, UNAUTHORIZED, FORBIDDEN,
                     REFUSED, UNAVAILABLE),
        ), api.bulk_dismiss),
        Route(Operation(
            "GET", _ORPHAN, "reviewOrphan",
            "One orphan: events, files, hints, decisions, ranked candidate jobs", tag,
            bearer=True,
            replies=(Reply(200, "The orphan", queue.OrphanView), UNAUTHORIZED, FORBIDDEN,
                     NOT_FOUND, UNAVAILABLE),
        ), api.show_orphan),
        Route(Operation(
            "POST", f"{_ORPHAN}/assign", "reviewAssign",
            "Give the orphan to a job (as `sorami-reconcile assign`)", tag, bearer=True,
            body=queue.AssignBody, description=_ACTION,
            replies=(Reply(200, "Assigned: the events replayed onto the job",
                           queue.Decision), *BAD_BODY, UNAUTHORIZED, FORBIDDEN, NOT_FOUND,
                     REFUSED, UNAVAILABLE),
        ), api.assign),
        Route(Operation(
            "POST", f"{_ORPHAN}/dismiss", "reviewDismiss",
            "Close the orphan as belonging to no job (as `sorami-reconcile dismiss`)", tag,
            bearer=True, body=queue.DismissBody, description=_ACTION,
            replies=(Reply(200, "Dismissed", queue.Decision), *BAD_BODY, UNAUTHORIZED,
                     FORBIDDEN, NOT_FOUND, REFUSED, UNAVAILABLE),
        ), api.dismiss),
        Route(Operation(
            "GET", "/review", "reviewConsole", "The review console: open orphans (HTML)", tag,
            bearer=True, query=queue.ReviewQuery,
            replies=(Reply(200, "The page", content_type="text/html"), UNAUTHORIZED,
                     FORBIDDEN, UNAVAILABLE),
        ), console.list_page),
        Route(Operation(
            "GET", "/review/console.css", "reviewStylesheet", "The console's stylesheet", tag,
            replies=(Reply(200, "CSS", content_type="text/css"),),
        ), console.stylesheet),
        Route(Operation(
            "GET", _PAGE, "reviewConsoleOrphan",
            "One orphan beside its candidates, with the actions (HTML)", tag, bearer=True,
            replies=(Reply(200, "The page", content_type="text/html"), UNAUTHORIZED,
                     FORBIDDEN, NOT_FOUND, UNAVAILABLE),
        ), console.detail_page),
        Route(Operation(
            "POST", f"{_PAGE}/assign", "reviewConsoleAssign",
            "The console's assign form (form fields job_id, reason, csrf_token)", tag,
            bearer=True, body_required=False,
            replies=(Reply(303, "Done: back to the list"),
                     problem(400, "The body is not a form"),
                     Reply(409, "Refused (HTML naming why)", content_type="text/html"),
                     Reply(422, "A blank reason (HTML)", content_type="text/html"),
                     UNAUTHORIZED, FORBIDDEN, NOT_FOUND, UNAVAILABLE),
        ), console.assign),
        Route(Operation(
            "POST", f"{_PAGE}/dismiss", "reviewConsoleDismiss",
            "The console's dismiss form (form fields reason, csrf_token)", tag, bearer=True,
            body_required=False,
            replies=(Reply(303, "Done: back to the list"),
                     problem(400, "The body is not a form"),
                     Reply(409, "Refused (HTML naming why)", content_type="text/html"),
                     Reply(422, "A blank reason (HTML)", content_type="text/html"),
                     UNAUTHORIZED, FORBIDDEN, NOT_FOUND, UNAVAILABLE),
        ), console.dismiss),
    ]


def setup_review(app: web.Application) -> None:
    table = routes()
    for route in table:
        app.router.add_route(route.operation.method, route.operation.path, route.handler)
    register(app, (route.operation for route in table))
