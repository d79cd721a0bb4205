"""`GET /openapi.json`: a valid OpenAPI 3.1 document of exactly the routes served."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web
from openapi_spec_validator import validate

from gateway.api import routes
from gateway.api.schemas import ImageRequest, VideoRequest
from gateway.app import create_app
from gateway.jobs.payload import WebhookPayload
from gateway.openapi import served_routes, undocumented_routes
from gateway.settings import Settings


async def document(client: Any) -> dict[str, Any]:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


async def test_document_is_valid_openapi_3_1(client: Any) -> None:
    doc = await document(client)
    assert doc["openapi"].startswith("3.1")
    validate(doc)


async def test_every_served_route_is_documented_and_nothing_else(
    client: Any, app: web.Application
) -> None:
    doc = await document(client)
    assert undocumented_routes(app) == []
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == set(served_routes(app))
    for path in ("/api/images/generate", "/api/videos/{id}/cancel", "/api/jobs/{id}/events",
                 "/api/notifications/{id}/read", "/healthz", "/readyz", "/openapi.json"):
        assert path in doc["paths"]


async def test_route_table_is_what_the_router_serves(app: web.Application) -> None:
    table = {(r.operation.method, r.operation.path) for r in routes()}
    assert table <= set(served_routes(app))
    assert len(table) == len(routes())


async def test_a_served_route_without_a_description_is_reported(
    make_settings: Callable[..., Settings],
) -> None:
    app = create_app(make_settings())

    async def extra(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/api/undocumented", extra)
    assert undocumented_routes(app) == [("GET", "/api/undocumented")]


async def test_bodies_are_the_schemas_the_handlers_decode_with(client: Any) -> None:
    doc = await document(client)
    schemas = doc["components"]["schemas"]
    for path, model in (("/api/images/generate", ImageRequest),
                        ("/api/videos/generate", VideoRequest)):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
        _, expected = msgspec.json.schema_components([model],
                                                     ref_template="#/components/schemas/{name}")
        assert schemas[model.__name__] == expected[model.__name__]
    image = schemas["ImageRequest"]["properties"]
    assert image["num_images"] == {"type": "integer", "minimum": 1, "maximum": 4, "default": 1}
    assert image["format"]["enum"] == ["JPEG", "PNG", "WEBP"]
    assert schemas["ImageRequest"]["required"] == ["prompt"]
    video = schemas["VideoRequest"]["properties"]
    assert video["duration_seconds"]["default"] == 8
    assert video["duration_seconds"]["minimum"] == 5


async def test_client_routes_require_the_bearer_token_or_on_get_the_session_cookie(
    client: Any,
) -> None:
    doc = await document(client)
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            client_route = path.startswith("/api/") and not path.startswith("/api/webhooks/")
            console_page = path.startswith("/review") and path != "/review/console.css"
            if client_route or console_page:
                cookie = [{"sessionCookie": []}] if method == "get" else []
                assert operation["security"] == [{"bearer": []}, *cookie], (method, path)
                assert "401" in operation["responses"], path
            else:
                assert operation["security"] == [], path
    scheme = doc["components"]["securitySchemes"]["sessionCookie"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "cookie", "__session")


async def test_without_a_session_cookie_setting_only_the_bearer_scheme_is_documented(
    make_settings: Any, aiohttp_client: Any
) -> None:
    client = await aiohttp_client(create_app(make_settings(auth_session_cookie=None)))
    doc = await document(client)
    assert list(doc["components"]["securitySchemes"]) == ["bearer"]
    assert doc["paths"]["/api/jobs/{id}/events"]["get"]["security"] == [{"bearer": []}]


async def test_query_parameters_come_from_the_query_schemas(client: Any) -> None:
    doc = await document(client)
    params = {p["name"]: p for p in doc["paths"]["/api/images/user"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 100
    assert params["limit"]["schema"]["default"] == 20
    assert params["cursor"]["in"] == "query"
    unread = {p["name"]: p for p in doc["paths"]["/api/notifications"]["get"]["parameters"]}
    assert unread["unread"]["schema"]["type"] == "boolean"


async def test_webhook_routes_are_documented_with_the_payload_schema_once_served(
    make_settings: Callable[..., Settings], aiohttp_client: Callable[..., Any]
) -> None:
    app = create_app(make_settings())

    async def receiver(request: web.Request) -> web.Response:
        return web.json_response({"outcome": "applied"})

    for kind in ("image", "video"):
        app.router.add_post(f"/api/webhooks/{kind}-completion", receiver)
    app.router.add_get("/metrics", receiver)
    client = await aiohttp_client(app)
    doc = await document(client)
    validate(doc)
    assert undocumented_routes(app) == []
    hook = doc["paths"]["/api/webhooks/video-completion"]["post"]
    assert hook["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WebhookPayload"}
    _, expected = msgspec.json.schema_components([WebhookPayload],
                                                 ref_template="#/components/schemas/{name}")
    assert doc["components"]["schemas"]["WebhookPayload"] == expected["WebhookPayload"]
    assert {"200", "202", "401", "503"} <= set(hook["responses"])
    assert "text/plain; version=0.0.4" in doc["paths"]["/metrics"]["get"]["responses"]["200"][
        "content"]


async def test_the_webhooks_refusal_of_a_non_json_body_is_documented(client: Any) -> None:
    doc = await document(client)
    for kind in ("image", "video"):
        path = f"/api/webhooks/{kind}-completion"
        resp = await client.post(path, data=b"{}", headers={"Content-Type": "text/plain"})
        assert resp.status == 415
        assert resp.content_type == "application/problem+json"
        assert "415" in doc["paths"][path]["post"]["responses"]


async def test_every_operation_documents_the_answers_to_malformed_http(client: Any) -> None:
    doc = await document(client)
    problem = {"$ref": "#/components/schemas/Problem"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status in ("400", "414", "431"):
                reply = operation["responses"].get(status)
                assert reply is not None, (method, path, status)
                assert reply["content"]["application/problem+json"]["schema"] == problem
    # an operation's own 400 is kept, not replaced
    webhook = doc["paths"]["/api/webhooks/image-completion"]["post"]["responses"]
    assert webhook["400"]["description"] == "The body is not JSON"


async def test_header_fields_together_over_the_limit_are_431_as_documented(
    client: Any,
) -> None:
    # each under HTTP_MAX_HEADER_FIELD_BYTES, together over HTTP_MAX_HEADER_BYTES
    padding = {f"X-Padding-{i}": "p" * 7000 for i in range(5)}
    resp = await client.get("/healthz", headers=padding)
    assert resp.status == 431
    assert resp.headers["Connection"] == "close"
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["status"] == 431
