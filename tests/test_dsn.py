"""Database URLs in every form the gateway is given: TCP and Unix socket, with and without a
password, with query parameters; read and rewritten by gateway.store.dsn alone."""

from __future__ import annotations

import asyncpg
import pytest

from gateway.store.dsn import DatabaseURL, InvalidDatabaseURL, database_name, with_database

# url, database, socket directory, host, port, the same URL on database "other"
FORMS = [
    ("postgresql://postgres@127.0.0.1:5432/test",
     "test", None, "127.0.0.1", 5432, "postgresql://postgres@127.0.0.1:5432/other"),
    ("postgresql://app:s3cr%40t@db.internal/sorami",
     "sorami", None, "db.internal", 5432, "postgresql://app:s3cr%40t@db.internal/other"),
    ("postgres://app@db:6432/sorami?sslmode=require&application_name=gw",
     "sorami", None, "db", 6432,
     "postgres://app@db:6432/other?sslmode=require&application_name=gw"),
    # the embedded server: empty password, no host, the socket directory as a parameter
    ("postgresql://postgres:@/sorami_t_0a1b?host=/tmp/pytest-of-root/pytest-1/embedded-pg0/pg",
     "sorami_t_0a1b", "/tmp/pytest-of-root/pytest-1/embedded-pg0/pg", None, 5432,
     "postgresql://postgres:@/other?host=%2Ftmp%2Fpytest-of-root%2Fpytest-1%2Fembedded-pg0%2Fpg"),
    ("postgresql:///sorami?host=/var/run/postgresql&port=5433",
     "sorami", "/var/run/postgresql", None, 5433,
     "postgresql:///other?host=%2Fvar%2Frun%2Fpostgresql&port=5433"),
    # the socket directory percent-encoded in the host part
    ("postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/sorami",
     "sorami", "/var/run/postgresql", None, 5432,
     "postgresql://postgres@%2Fvar%2Frun%2Fpostgresql/other"),
    # the database named by a parameter wins over the path, and is replaced with it
    ("postgresql://u@h/ignored?dbname=real", "real", None, "h", 5432, "postgresql://u@h/other"),
    ("postgresql://u@h/?database=real&sslmode=disable",
     "real", None, "h", 5432, "postgresql://u@h/other?sslmode=disable"),
    # no database at all: libpq connects to the user's own
    ("postgresql://alice@h", "alice", None, "h", 5432, "postgresql://alice@h/other"),
    ("postgresql://[::1]:5544/test", "test", None, "::1", 5544, "postgresql://[::1]:5544/other"),
    ("postgresql://u@h1:5432,h2:5433/multi", "multi", None, "h1", 5432,
     "postgresql://u@h1:5432,h2:5433/other"),
]


@pytest.mark.parametrize(("url", "database", "socket", "host", "port", "other"), FORMS)
def test_each_form_is_read_and_rewritten(
    url: str, database: str, socket: str | None, host: str | None, port: int, other: str
) -> None:
    parsed = DatabaseURL.parse(url)
    assert database_name(url) == parsed.database == database
    assert parsed.socket_directory == socket
    assert parsed.host == host
    assert parsed.port == port
    assert with_database(url, "other") == other
    assert database_name(other) == "other"
    # rewriting twice is rewriting once; rewriting to its own name changes nothing it means
    assert with_database(other, "other") == other
    assert database_name(with_database(url, database)) == database


@pytest.mark.parametrize(("url", "relayed"), [
    ("postgresql://postgres:@/sorami?host=/tmp/s&port=5433&sslmode=disable",
     "postgresql://postgres:@127.0.0.1:6000/sorami?sslmode=disable"),
    ("postgresql://app:pw@db:5432/sorami", "postgresql://app:pw@127.0.0.1:6000/sorami"),
    ("postgresql:///sorami?host=/tmp/s", "postgresql://127.0.0.1:6000/sorami"),
])
def test_the_same_database_can_be_reached_at_another_tcp_address(url: str, relayed: str) -> None:
    moved = DatabaseURL.parse(url).with_tcp_address("127.0.0.1", 6000)
    assert str(moved) == relayed
    assert (moved.host, moved.port, moved.socket_directory) == ("127.0.0.1", 6000, None)


@pytest.mark.parametrize("name", ["with space", "ümlaut", "a/b", "q?x"])
def test_a_database_name_that_needs_quoting_survives_the_round_trip(name: str) -> None:
    url = with_database("postgresql://postgres:@/x?host=/tmp/s", name)
    assert database_name(url) == name
    assert DatabaseURL.parse(url).socket_directory == "/tmp/s"


@pytest.mark.parametrize("url", ["mysql://u@h/db", "127.0.0.1:5432/test", "", "postgresql://h/db#x"])
def test_what_is_not_a_postgresql_url_is_refused(url: str) -> None:
    with pytest.raises(InvalidDatabaseURL):
        DatabaseURL.parse(url)


async def test_the_rewritten_url_reaches_the_database_it_names(database_url: str) -> None:
    """Over whichever transport this run uses (TCP or the embedded server's socket)."""
    conn = await asyncpg.connect(with_database(database_url, "postgres"))
    try:
        assert await conn.fetchval("SELECT current_database()") == "postgres"
    finally:
        await conn.close()
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT current_database()") == database_name(database_url)
    finally:
        await conn.close()
