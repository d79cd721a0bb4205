"""The gateway's exceptions: one root, subclasses whose docstring is the default message.

HTTP-facing errors carry their status and an RFC 9457 problem type; the error middleware
(`gateway.middleware`) turns them into `application/problem+json` answers.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """The gateway could not do what was asked."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ProblemError(GatewayError):
    """The request could not be served."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal Server Error"
    # the connection is closed after the answer: what follows on it cannot be trusted
    closes_connection: ClassVar[bool] = False

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.extra = extra

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ProblemError):
    """The request body is not valid JSON."""

    status = 400
    slug = "bad-request"
    title = "Bad Request"


class MalformedRequest(BadRequest):
    """The request is not well-formed HTTP."""

    closes_connection = True

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class Unauthorized(ProblemError):
    """Authentication is required and was missing or invalid."""

    status = 401
    slug = "unauthorized"
    title = "Unauthorized"

    def __init__(self, message: str | None = None, *, scheme: str | None = None) -> None:
        super().__init__(message)
        self.scheme = scheme

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": self.scheme} if self.scheme else {}


class Forbidden(ProblemError):
    """The caller is authenticated but not allowed here."""

    status = 403
    slug = "forbidden"
    title = "Forbidden"


class NotFound(ProblemError):
    """No such resource."""

    status = 404
    slug = "not-found"
    title = "Not Found"


class Conflict(ProblemError):
    """The resource is in a state that does not allow this."""

    status = 409
    slug = "conflict"
    title = "Conflict"


class PayloadTooLarge(ProblemError):
    """The request body is larger than allowed."""

    status = 413
    slug = "payload-too-large"
    title = "Payload Too Large"


class UriTooLong(MalformedRequest):
    """The request line is longer than the server accepts."""

    status = 414
    slug = "uri-too-long"
    title = "URI Too Long"


class HeaderFieldsTooLarge(MalformedRequest):
    """The request's header fields are larger than the server accepts."""

    status = 431
    slug = "request-header-fields-too-large"
    title = "Request Header Fields Too Large"


class UnsupportedMediaType(ProblemError):
    """The request body must be application/json."""

    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported Media Type"


class Unprocessable(ProblemError):
    """The request is well-formed but a field is invalid."""

    status = 422
    slug = "validation-error"
    title = "Unprocessable Content"

    def __init__(self, message: str | None = None, *, field: str | None = None) -> None:
        super().__init__(message, **({"field": field} if field else {}))
        self.field = field


class ServiceUnavailable(ProblemError):
    """The service is temporarily unavailable; retry later."""

    status = 503
    slug = "service-unavailable"
    title = "Service Unavailable"

    def __init__(self, message: str | None = None, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyRequests(ProblemError):
    """Too many requests; retry later."""

    status = 429
    slug = "too-many-requests"
    title = "Too Many Requests"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int,
        extra_headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message, **extra)
        self.retry_after = retry_after
        self.extra_headers = extra_headers or {}

    def headers(self) -> dict[str, str]:
        return {**self.extra_headers, "Retry-After": str(self.retry_after)}
