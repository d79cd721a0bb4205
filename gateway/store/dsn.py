"""PostgreSQL connection URLs, read and rewritten in one place.

asyncpg takes libpq's URL form: ``postgresql://[user[:password]@][host][:port][/dbname][?k=v]``.
The host may instead come as a ``host=`` query parameter naming a Unix-socket directory (the
embedded server's ``postgresql://postgres:@/sorami?host=/tmp/.../pg``), and the database name
as ``dbname=`` (libpq) or ``database=`` (asyncpg). Reading the name as "what follows the last
slash" breaks on both, so everything that needs the database name, or the same server with
another database, asks this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

SCHEMES = ("postgresql", "postgres")
# query parameters that name the database, in libpq's and asyncpg's spelling
_DATABASE_PARAMETERS = ("dbname", "database")
DEFAULT_PORT = 5432


class InvalidDatabaseURL(ValueError):
    """Not a postgresql:// URL."""


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed connection URL; ``str()`` gives it back, rewritten where asked."""

    scheme: str
    netloc: str  # kept as written: user, password, one or several host[:port]
    path_database: str
    query: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> DatabaseURL:
        parts = urlsplit(text.strip())
        if parts.scheme not in SCHEMES:
            raise InvalidDatabaseURL(f"must be a postgresql:// URL, got scheme {parts.scheme!r}")
        if parts.fragment:
            raise InvalidDatabaseURL("must not have a #fragment")
        return cls(
            scheme=parts.scheme,
            netloc=parts.netloc,
            path_database=unquote(parts.path.lstrip("/")),
            query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
        )

    def _param(self, name: str) -> str | None:
        for key, value in reversed(self.query):
            if key == name:
                return value
        return None

    @property
    def user(self) -> str | None:
        userinfo, at, _ = self.netloc.rpartition("@")
        if at and userinfo:
            return unquote(userinfo.partition(":")[0]) or None
        return self._param("user")

    @property
    def database(self) -> str:
        """The database a connection goes to: dbname=, else the path, else the user's name."""
        for name in _DATABASE_PARAMETERS:
            value = self._param(name)
            if value:
                return value
        return self.path_database or self.user or "postgres"

    @property
    def socket_directory(self) -> str | None:
        """The Unix-socket directory when the URL connects over one, else None."""
        first = self._first_host
        host = self._param("host") or unquote(first.rpartition(":")[0] or first)
        return host if host.startswith("/") else None

    @property
    def host(self) -> str | None:
        """The (first) TCP host, or None over a Unix socket."""
        if self.socket_directory is not None:
            return None
        return urlsplit(f"//{self._first_host}").hostname or self._param("host")

    @property
    def port(self) -> int:
        raw = self._param("port") or urlsplit(f"//{self._first_host}").port
        return int(raw) if raw else DEFAULT_PORT

    @property
    def _first_host(self) -> str:
        return self._hosts.split(",")[0]

    @property
    def _hosts(self) -> str:
        return self.netloc.rpartition("@")[2]

    def with_database(self, name: str) -> DatabaseURL:
        """The same server, user and options, another database."""
        query = tuple((k, v) for k, v in self.query if k not in _DATABASE_PARAMETERS)
        return DatabaseURL(self.scheme, self.netloc, name, query)

    def with_tcp_address(self, host: str, port: int) -> DatabaseURL:
        """The same user, database and options, reached over TCP at host:port."""
        userinfo, at, _ = self.netloc.rpartition("@")
        query = tuple((k, v) for k, v in self.query if k not in ("host", "port", "hostaddr"))
        return DatabaseURL(self.scheme, f"{userinfo}{at}{host}:{port}", self.path_database, query)

    def __str__(self) -> str:
        text = f"{self.scheme}://{self.netloc}/{quote(self.path_database, safe='')}"
        return text + (f"?{urlencode(self.query)}" if self.query else "")


def database_name(url: str) -> str:
    """The name of the database `url` connects to."""
    return DatabaseURL.parse(url).database


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`."""
    return str(DatabaseURL.parse(url).with_database(name))
