"""A store URL's password kept off Prefect: split it off before a flow is called, put it back where it runs.

A ``postgresql://user:password@host/db`` handed to a flow as a parameter is written into Prefect's database
in clear (and shown in its UI). So the CLI passes the URL *without* its password (a reference to the
database) and the flow, in whatever process or machine runs it, looks the password up again with
``resolve_password`` among the URLs that place knows: ``LABTWIN_STORE`` and the lab file's ``store:``.
A candidate counts only if it names the same database (user, host, port, database and options equal);
a URL for another database is never borrowed from. When none has a password the URL is used as it is and
psycopg's libpq reads its own sources: ``PGPASSWORD``, ``PGPASSFILE`` or ``~/.pgpass`` (libpq does this
natively for every connection without a password; nothing labtwin needs to do).

A SQLite path has no password and passes through every function here unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

POSTGRES_SCHEMES = ("postgresql+psycopg://", "postgresql://", "postgres://")
DEFAULT_PORT = 5432


def is_postgres(url: str | None) -> bool:
    return url is not None and url.startswith(POSTGRES_SCHEMES)


def split_password(url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password as written in it), from ``user:password@`` and from a
    ``password=`` query parameter (libpq takes both); a URL without one comes back as it is, with None."""
    if not is_postgres(url):
        return url, None
    scheme, rest = url.split("://", 1)
    # As libpq and RFC 3986 read it: the authority ends at the first '/', '?' or '#' (a password holding one
    # of them is percent-encoded); the user's part ends at its last '@'.
    end = re.search(r"[/?#]", rest)
    authority, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
    password: str | None = None
    userinfo, at, hostport = authority.rpartition("@")
    if at:
        user, colon, secret = userinfo.partition(":")
        if colon:
            password = unquote(secret)
        authority = f"{user}@{hostport}" if user else hostport
    path, question, query = tail.partition("?")
    if question:
        query, hash_, fragment = query.partition("#")
        kept = []
        for part in query.split("&"):
            key, _, value = part.partition("=")
            if unquote(key) == "password":
                password = unquote(value)
            elif part:
                kept.append(part)
        tail = path + (f"?{'&'.join(kept)}" if kept else "") + (f"#{fragment}" if hash_ else "")
    return f"{scheme}://{authority}{tail}", password


def without_password(url: str) -> str:
    """The URL as a Prefect parameter may carry it: no password (a SQLite path as it is)."""
    return split_password(url)[0]


def _database(url: str) -> tuple[str | None, str | None, int, str, tuple[str, ...]]:
    """What identifies a PostgreSQL database in a URL, its password and scheme spelling left out."""
    bare = split_password(url)[0]
    parts = urlsplit("postgresql://" + bare.split("://", 1)[1])
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        port = -1
    user = unquote(parts.username) if parts.username else None
    host = parts.hostname.lower() if parts.hostname else None
    query = tuple(sorted(p for p in parts.query.split("&") if p))
    return user, host, port, unquote(parts.path), query


def same_database(a: str, b: str) -> bool:
    """Both PostgreSQL URLs name the same user on the same database (passwords and scheme spelling aside)."""
    return is_postgres(a) and is_postgres(b) and _database(a) == _database(b)


@dataclass(frozen=True)
class Resolved:
    url: str  # to connect with: it may hold the password, so never print, log or pass it on
    source: str  # where the password came from, for a log line: "the URL", "LABTWIN_STORE", ... or "libpq"


def resolve_password(url: str, candidates: Iterable[tuple[str, str | None]]) -> Resolved:
    """The URL with its password, looked up here: the URL's own, else the first ``(source, candidate)``
    naming the same database with a password, else the URL as it is (libpq: PGPASSWORD, ~/.pgpass)."""
    if not is_postgres(url):
        return Resolved(url, "none needed")
    if split_password(url)[1] is not None:
        return Resolved(url, "the URL")
    for source, candidate in candidates:
        if candidate and split_password(candidate)[1] is not None and same_database(url, candidate):
            return Resolved(candidate, source)
    return Resolved(url, "libpq (PGPASSWORD, PGPASSFILE or ~/.pgpass), if any")


def store_line_of(lab_file: str | Path) -> str | None:
    """The ``store:`` line of a lab file, or None where the file is not on this machine or has none.

    Read here, not through labtwin.config (a higher room than the flows'): only a candidate for a password,
    used when it names the very database the flow was given, so the rest of the file needs no checking."""
    try:
        data = yaml.safe_load(Path(lab_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    store = data.get("store") if isinstance(data, dict) else None
    return store if isinstance(store, str) else None
