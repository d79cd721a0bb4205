"""What the gateway answers for each kind of request aiohttp's parser refuses, and how a
connection tells an over-long request line from an over-long header field."""

from __future__ import annotations

import asyncio

from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    InvalidHeader,
    LineTooLong,
)

from gateway.deadlines import HeadDeadlineProtocol
from gateway.malformed import HeadSoFar, refusal

LINE, FIELD = 8190, 8190


def test_a_line_too_long_within_the_request_line_is_414() -> None:
    error, sizes = refusal(LineTooLong(b"/api...", LINE), HeadSoFar(9000, 9000), LINE, FIELD)
    assert (error.status, sizes["limit_bytes"], sizes["request_line_bytes"]) == (414, LINE, 9000)


def test_a_line_too_long_after_the_request_line_is_431() -> None:
    error, sizes = refusal(LineTooLong(b"xxx...", FIELD), HeadSoFar(24, 9100), LINE, FIELD)
    assert (error.status, sizes["limit_bytes"], sizes["head_bytes_received"]) == (431, FIELD, 9100)


def test_a_line_too_long_where_the_head_is_not_known_is_400() -> None:
    error, sizes = refusal(LineTooLong(b"xxx...", FIELD), None, LINE, FIELD)
    assert (error.status, sizes) == (400, {})


def test_too_many_header_fields_is_431() -> None:
    error, sizes = refusal(BadHttpMessage("Too many headers received"), HeadSoFar(24, 2000),
                           LINE, FIELD)
    assert (error.status, sizes["limit_fields"]) == (431, 128)


def test_other_refusals_are_400_without_the_clients_bytes() -> None:
    for exc in (BadHttpMethod(error="Invalid method encountered:\n\n  b'G@T / HTTP/1.1'\n  ^"),
                InvalidHeader(b"X-\x01"),
                BadHttpMessage("Invalid header value char:\n\n  b'X-A: b\\x00c'\n      ^")):
        error, _ = refusal(exc, HeadSoFar(24, 40), LINE, FIELD)
        assert error.status == 400
        assert error.closes_connection
        assert "b'" not in error.message, error.message


def test_the_connection_counts_the_request_line_across_reads() -> None:
    head = HeadDeadlineProtocol(asyncio.Protocol(), timeout=30)
    head.data_received(b"GET /" + b"a" * 5000)
    head.data_received(b"b" * 5000)
    assert head.head_so_far() == HeadSoFar(request_line_bytes=10005, received_bytes=10005)
    head.data_received(b" HTTP/1.1\r\nHost: x\r\n")
    assert head.head_so_far() == HeadSoFar(request_line_bytes=10014, received_bytes=10025)


def test_bytes_arriving_while_a_handler_runs_make_the_head_unknown() -> None:
    head = HeadDeadlineProtocol(asyncio.Protocol(), timeout=30)
    head.data_received(b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
    head.request_started()
    head.data_received(b"GET /pipelined HTTP/1.1\r\n")
    assert head.head_so_far() is None
