"""structlog: JSON lines when stderr is not a terminal, readable console output on one.

Every line carries what the request context bound (`request_id`, and `job_id`,
`webhook_id`, `user_id` where a handler bound them; see `gateway.observability`) and the
process id, which tells workers apart. Two processors guard what leaves the process:
prompts appear at info level and above only as length and hash, and values that look like
credentials are redacted, whether under a secret-bearing key or inside a string (bearer
tokens, `whsec_` secrets, JWTs, webhook signatures, passwords in database URLs). Records of
the standard library's loggers (aiohttp, asyncio, asyncpg) are rendered the same way.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from gateway.jobs.prompts import fingerprint

REDACTED = "[REDACTED]"

# A key holding any of these words holds a credential, whatever the exact spelling
# (Authorization, webhook-signature, X-Webhook-Secret, backend_api_key, access_token...).
_SECRET_KEY_WORDS = (
    "authorization", "token", "secret", "password", "passwd", "api_key", "apikey",
    "signature", "cookie", "credential", "private_key", "database_url", "dsn",
)
_SECRET_VALUES = re.compile(
    r"(?P<bearer>\b(?:Bearer|Basic)\s+)[^\s,;\"']+"
    r"|(?P<whsec>\bwhsec_)[A-Za-z0-9+/=_-]+"
    r"|\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"
    r"|(?P<sig>\bv1,)[A-Za-z0-9+/=]{16,}"
    r"|(?P<url>\bpostgres(?:ql)?://[^:/@\s]+:)[^@\s]+(?=@)",
    re.IGNORECASE,
)
_PROMPT_KEYS = ("prompt", "original_prompt", "prompt_norm")
_ACCESS_LOGGERS = ("aiohttp.access",)


def _is_secret_key(key: object) -> bool:
    name = str(key).lower().replace("-", "_")
    return any(word in name for word in _SECRET_KEY_WORDS)


def _scrub_text(text: str) -> str:
    def keep_prefix(match: re.Match[str]) -> str:
        prefix = match["bearer"] or match["whsec"] or match["sig"] or match["url"] or ""
        return prefix + REDACTED

    return _SECRET_VALUES.sub(keep_prefix, text)


def _scrub(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _scrub_text(value)
    if depth > 4:  # deeper structures are not logged on purpose; stop walking
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _is_secret_key(k) else _scrub(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub(v, depth + 1) for v in value]
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """The safety net: no credential reaches a log line, whoever logged it."""
    return {
        key: REDACTED if _is_secret_key(key) else _scrub(value)
        for key, value in event_dict.items()
    }


def summarize_prompts(_logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """At info level and above a prompt is logged as its length and a short hash."""
    if method == "debug":
        return event_dict
    for key in _PROMPT_KEYS:
        prompt = event_dict.get(key)
        if isinstance(prompt, str):
            del event_dict[key]
            event_dict[f"{key}_length"] = len(prompt)
            event_dict[f"{key}_hash"] = fingerprint(prompt)
    return event_dict


def add_pid(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    event_dict["pid"] = os.getpid()
    return event_dict


class _SoramiHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (and replaces when configured again)."""


def configure(
    level: str = "info", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the standard library's root logger for this process."""
    out = sys.stderr if stream is None else stream
    as_json = (not out.isatty()) if json is None else json
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_pid,
    ]
    # JSON carries the traceback as text, so it passes through the redaction too; the
    # console renderer formats exceptions itself, readably
    finish: list[Processor] = [summarize_prompts]
    if as_json:
        finish.append(structlog.processors.format_exc_info)
    finish += [redact_secrets, renderer]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, *finish],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # one write per line: workers share stderr, and print() writes the newline apart
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )

    handler = _SoramiHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *finish],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SoramiHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # the gateway writes its own access line (route template, request id)
    for name in _ACCESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
