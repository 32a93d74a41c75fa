"""From the store URL a user types to a SQLAlchemy engine.

Users write what they wrote before SQLAlchemy: a file path, ``sqlite:///path``
or ``postgresql://user@host/db``. SQLite runs in WAL mode (readers never block
the recorder) and its transactions are begun by us, not by the sqlite3 module,
so a writer can say ``BEGIN IMMEDIATE`` and wait its turn for the write lock
instead of failing half way when another process got there first.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from labtwin.data.defaults import DEFAULT_SQLITE  # re-exported: the store's default path
from labtwin.security.redact import redact

# Execution option of a connection whose next transaction writes: on SQLite it begins IMMEDIATE.
WRITE = {"labtwin_write": True}


class StoreURLError(ValueError):
    """A store URL of a database labtwin does not store into; the message names it (password hidden)."""


@dataclass(frozen=True)
class StoreURL:
    """Where a store lives: ``path`` for SQLite, ``sqlalchemy_url`` for PostgreSQL."""

    text: str
    path: Path | None = None
    sqlalchemy_url: str | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.path is not None


def parse_url(url: str | Path | None) -> StoreURL:
    """``None`` or a path or ``sqlite:///path``: SQLite; ``postgresql://...``: PostgreSQL through psycopg 3."""
    text = str(url) if url is not None else str(DEFAULT_SQLITE)
    for scheme in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if text.startswith(scheme):
            return StoreURL(text, sqlalchemy_url="postgresql+psycopg://" + text[len(scheme) :])
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
    elif "://" in text:
        raise StoreURLError(
            f"store {describe_url(text)}: labtwin stores into a SQLite file or postgresql://user@host/db "
            "(--store, LABTWIN_STORE or the lab file's store:)"
        )
    return StoreURL(text, path=Path(text))


def describe_url(url: str | Path | None) -> str:
    """The URL for a message, a log line or ``--json``: its secrets redacted as everywhere in labtwin
    (labtwin.security.redact), and its user hidden too (``postgresql://***@host``); a SQLite path as it is."""
    text = redact(str(url) if url is not None else str(DEFAULT_SQLITE))
    if "://" in text:
        scheme, rest = text.split("://", 1)
        end = re.search(r"[/?#]", rest)
        authority, tail = (rest[: end.start()], rest[end.start() :]) if end else (rest, "")
        if "@" in authority:
            authority = "***@" + authority.rpartition("@")[2]
        text = f"{scheme}://{authority}{tail}"
    return text


def make_engine(where: StoreURL, *, read_only: bool = False) -> Engine:
    if where.path is None:
        assert where.sqlalchemy_url is not None
        try:
            import psycopg  # noqa: F401
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError("PostgreSQL needs psycopg: pip install 'labtwin[postgres]'") from None
        # pre_ping: the recorder holds connections for weeks, across database restarts.
        return create_engine(where.sqlalchemy_url, pool_pre_ping=True)
    return _sqlite_engine(where.path, read_only)


def _sqlite_engine(path: Path, read_only: bool) -> Engine:
    if read_only and str(path) != ":memory:":
        url = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    # ":memory:" (dry runs): one database lives in one connection, so every thread must share it (and the store
    # then takes turns, see Store); a file gets a pool, and SQLite's own locking arbitrates.
    in_memory = str(path) == ":memory:"
    pool: dict[str, Any] = {"poolclass": StaticPool} if in_memory else {}
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30.0}, **pool)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        if not read_only and not in_memory:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("labtwin_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
