"""`GET /openapi.json`: an OpenAPI 3.1 document of every route the app serves.

Each route is described by an `Operation` next to the code that registers it (the client API
keeps one table that both registers its routes and describes them); bodies, answers and query
parameters are the very msgspec types the handlers decode and encode with, turned into JSON
Schema by `msgspec.json.schema_components`. The document is built from the app's router, so a
route that is not served is not documented, and `undocumented_routes(app)` names any served
route without an Operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Annotated, Any, Final, Literal

import msgspec
from aiohttp import web

from gateway import __version__, keys
from gateway.auth import SESSION_COOKIE_METHODS
from gateway.jobs.payload import WebhookPayload

OPENAPI_VERSION: Final = "3.1.0"
REF_TEMPLATE: Final = "#/components/schemas/{name}"
PROBLEM_JSON: Final = "application/problem+json"
SESSION_SCHEME: Final = "sessionCookie"


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem document: every error answer of the gateway."""

    type: str
    title: str
    status: int
    detail: str | None = None
    field: Annotated[str | None, msgspec.Meta(description="the invalid field, on 422/413")] = None
    limit: Annotated[
        str | None, msgspec.Meta(description="the limit reached (its setting's name), on 429")
    ] = None
    value: Annotated[int | None, msgspec.Meta(description="that limit's value, on 429")] = None


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    status: int
    description: str
    schema: Any = None
    content_type: str = "application/json"
    headers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    name: str
    description: str
    required: bool = False
    schema: Any = str


@dataclasses.dataclass(frozen=True, slots=True)
class Operation:
    """One route: what it takes and what it answers."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    replies: tuple[Reply, ...]
    description: str = ""
    body: Any = None
    body_required: bool = True
    query: Any = None
    headers: tuple[Header, ...] = ()
    bearer: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.method.upper(), self.path)


def problem(status: int, description: str, *headers: str) -> Reply:
    return Reply(status, description, Problem, PROBLEM_JSON, headers)


UNAUTHORIZED = problem(401, "Missing or invalid bearer token (one body for every cause).",
                       "WWW-Authenticate")
NOT_FOUND = problem(404, "No such resource, or not the caller's (the same answer).")
UNAVAILABLE = problem(503, "The database or the identity provider is unavailable.",
                      "Retry-After")

# every route: what the server answers before any handler runs (see gateway.malformed)
MALFORMED_REPLIES: Final = (
    problem(400, "The request is not well-formed HTTP (method, version, header characters, "
                 "chunked or content coding of the body); the connection is closed"),
    problem(414, "The request line is longer than HTTP_MAX_REQUEST_LINE_BYTES; the connection "
                 "is closed"),
    problem(431, "A header field is longer than HTTP_MAX_HEADER_FIELD_BYTES, there are more "
                 "than 128, or together they are over HTTP_MAX_HEADER_BYTES; the connection is "
                 "closed"),
)

_HEADER_DOCS: Final = {
    "WWW-Authenticate": "`Bearer`",
    "Retry-After": "seconds to wait before retrying",
    "Idempotent-Replayed": "`true` when an earlier request with this Idempotency-Key made the job",
    "RateLimit-Policy": 'the caller\'s limits for this kind (IETF httpapi-ratelimit-headers), '
    'e.g. `"images-hour";q=200;w=3600, "images-active";q=10`; absent when both are off',
    "RateLimit": "what remains of each policy, and for the hourly one the seconds until its "
    'oldest counted creation leaves the window: `"images-hour";r=150;t=1800, '
    '"images-active";r=7`',
}


def register(app: web.Application, operations: Iterable[Operation]) -> None:
    """Record the descriptions of routes a setup_x adds (before the app starts)."""
    table = app.setdefault(keys.OPERATIONS, {})
    for operation in operations:
        table[operation.key] = operation


def served_routes(app: web.Application) -> list[tuple[str, str]]:
    """(method, path template) of every route served, HEAD counted with its GET, and the
    CORS preflights (OPTIONS) left to the CORS specification."""
    found = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "OPTIONS"):
            continue
        found.append((route.method.upper(), path))
    return found


def undocumented_routes(app: web.Application) -> list[tuple[str, str]]:
    table = app.get(keys.OPERATIONS, {})
    return [key for key in served_routes(app) if key not in table]


def build_document(app: web.Application) -> dict[str, Any]:
    table = app.get(keys.OPERATIONS, {})
    operations = [table[key] for key in served_routes(app) if key in table]
    types = _schema_types(operations)
    schemas, components = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    ref = dict(zip(types, schemas, strict=True))
    cookie = app[keys.SETTINGS].auth_session_cookie
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(
            operation, ref, session_cookie=cookie is not None
        )
    security_schemes: dict[str, Any] = {
        "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    }
    if cookie is not None:
        security_schemes[SESSION_SCHEME] = {
            "type": "apiKey",
            "in": "cookie",
            "name": cookie,
            "description": "The session JWT (Clerk's), verified like the bearer token; "
            "accepted on GET routes when there is no Authorization header.",
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sorami-gateway",
            "version": __version__,
            "description": (
                "Jobs for the Sorami image and video generator: the client API (bearer JWT), "
                "the generator backend's signed webhooks, and operations routes."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": components,
            "securitySchemes": security_schemes,
        },
    }


def _schema_types(operations: list[Operation]) -> list[Any]:
    seen: dict[Any, None] = {}
    for operation in operations:
        if operation.body is not None:
            seen[operation.body] = None
        for reply in _replies(operation):
            if reply.schema is not None:
                seen[reply.schema] = None
        if operation.query is not None:
            for field in msgspec.structs.fields(operation.query):
                seen[field.type] = None
        for header in operation.headers:
            seen[header.schema] = None
    return list(seen)


def _operation(
    operation: Operation, ref: dict[Any, Any], *, session_cookie: bool
) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _path_parameters(operation.path)
    ]
    if operation.query is not None:
        for field in msgspec.structs.fields(operation.query):
            parameters.append({
                "name": field.encode_name,
                "in": "query",
                "required": field.required,
                "schema": ref[field.type] | _default(field),
            })
    for header in operation.headers:
        parameters.append({
            "name": header.name,
            "in": "header",
            "required": header.required,
            "description": header.description,
            "schema": ref[header.schema],
        })
    spec: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "tags": [operation.tag],
        "responses": {str(r.status): _reply(r, ref) for r in _replies(operation)},
    }
    if operation.description:
        spec["description"] = operation.description
    if parameters:
        spec["parameters"] = parameters
    if operation.body is not None:
        spec["requestBody"] = {
            "required": operation.body_required,
            "content": {"application/json": {"schema": ref[operation.body]}},
        }
    security: list[dict[str, list[str]]] = [{"bearer": []}] if operation.bearer else []
    if operation.bearer and session_cookie and operation.method in SESSION_COOKIE_METHODS:
        security.append({SESSION_SCHEME: []})
    spec["security"] = security
    return spec


def _replies(operation: Operation) -> tuple[Reply, ...]:
    """The operation's own answers, then the malformed-request answers it does not name."""
    own = {reply.status for reply in operation.replies}
    return (*operation.replies, *(r for r in MALFORMED_REPLIES if r.status not in own))


def _reply(reply: Reply, ref: dict[Any, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"description": reply.description}
    if reply.schema is not None:
        spec["content"] = {reply.content_type: {"schema": ref[reply.schema]}}
    elif reply.content_type != "application/json":
        spec["content"] = {reply.content_type: {"schema": {"type": "string"}}}
    if reply.headers:
        spec["headers"] = {
            name: {"description": _HEADER_DOCS.get(name, name), "schema": {"type": "string"}}
            for name in reply.headers
        }
    return spec


def _default(field: msgspec.structs.FieldInfo) -> dict[str, Any]:
    if field.default is msgspec.NODEFAULT:
        return {}
    return {"default": msgspec.to_builtins(field.default)}


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


# --- the routes other modules serve without a table of their own -------------------------


class Health(msgspec.Struct):
    status: Literal["ok"]


class Readiness(msgspec.Struct, omit_defaults=True):
    status: Literal["ready", "unavailable"]
    database: str | None = None


class WebhookOutcome(msgspec.Struct):
    outcome: Literal["applied", "duplicate", "stale", "orphaned"]


_SIGNATURE_HEADERS = (
    Header("webhook-id", "Standard Webhooks: the delivery's id"),
    Header("webhook-timestamp", "Standard Webhooks: Unix seconds when signed"),
    Header("webhook-signature", "Standard Webhooks: `v1,<base64 HMAC-SHA256>` (several allowed)"),
    Header("X-Webhook-Secret", "the legacy shared secret, only when LEGACY_WEBHOOK_SECRET is set"),
)


def _webhook(kind: str) -> Operation:
    return Operation(
        "POST",
        f"/api/webhooks/{kind}-completion",
        f"{kind}Webhook",
        f"The generator backend reports progress or the result of a {kind} job",
        "webhooks",
        body=WebhookPayload,
        headers=_SIGNATURE_HEADERS,
        description=(
            "Signed per Standard Webhooks (secrets `whsec_...`, several active for rotation). "
            "The signature is verified on the raw body before it is parsed."
        ),
        replies=(
            Reply(200, "Applied, a duplicate delivery, or older than the job's state",
                  WebhookOutcome),
            Reply(202, "No job with that id yet: kept as an orphan for the reconciler",
                  WebhookOutcome),
            problem(400, "The body is not JSON"),
            problem(401, "Bad, missing or expired signature (one body for every cause)"),
            problem(413, "The body is larger than WEBHOOK_MAX_BODY_BYTES"),
            problem(415, "The Content-Type is not application/json"),
            problem(422, "The body is not a valid payload; `field` names where"),
            problem(503, "The database is unavailable: nothing was acknowledged", "Retry-After"),
        ),
    )


OPERATIONS_ROUTES: Final = (
    Operation("GET", "/healthz", "healthz", "The process is alive", "operations",
              replies=(Reply(200, "Alive", Health),)),
    Operation("GET", "/readyz", "readyz",
              "The database answers and every migration is applied", "operations",
              replies=(Reply(200, "Ready", Readiness),
                       Reply(503, "Not ready", Readiness, headers=("Retry-After",)))),
    Operation("GET", "/metrics", "metrics", "Prometheus metrics", "operations",
              replies=(Reply(200, "The text exposition format",
                             content_type="text/plain; version=0.0.4"),)),
    Operation("GET", "/openapi.json", "openapi", "This document", "operations",
              replies=(Reply(200, "An OpenAPI 3.1 document"),)),
    _webhook("image"),
    _webhook("video"),
)


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(build_document(request.app))


def setup_openapi(app: web.Application) -> None:
    """Serve the document; describe the operations routes served by modules without a table."""
    register(app, OPERATIONS_ROUTES)
    app.router.add_get("/openapi.json", openapi_json)
