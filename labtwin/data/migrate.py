"""The store's schema version, and moving a database forward to the one this labtwin writes.

A lab's database outlives many labtwin releases, so each schema change is an
Alembic revision (``migrations/versions/NNNN_*.py``; the schema version is
NNNN) and a database records the revision it is at in ``alembic_version``.
Databases made before migrations existed (labtwin 0.1) have no such table:
their tables are checked against schema 1 and adopted.

Migrating happens in one transaction holding the database's write lock
(``BEGIN IMMEDIATE`` on SQLite, an advisory lock on PostgreSQL), so two
processes opening an old store at once migrate it once, and a failed
migration leaves it as it was. No ``alembic.ini``: the Alembic ``Config`` is
built here, pointing at the scripts shipped inside the package.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from labtwin.data.engine import WRITE, StoreURL, describe_url, make_engine, parse_url

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"

# Any fixed number: the key of the PostgreSQL advisory lock migrations hold ("LABTWIN" in ASCII, truncated).
_PG_LOCK_KEY = 0x4C414254

# labtwin 0.1's tables and their columns, frozen (revision 0001 creates them). The first four existed from the
# start; the last three were added by later 0.1 commits, which created them on open when missing.
SCHEMA_1_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset(
        "run_id lab channel cell_id protocol n_steps started_at stopped_at exit_status reason reported_samples "
        "reported_last_seq cell_time_s flow_run_id start_doc stop_doc".split()
    ),
    "batches": frozenset("run_id seq n".split()),
    "samples": frozenset("run_id seq i time_s voltage_v current_a capacity_ah temperature_c step cycle".split()),
    "step_events": frozenset(
        "run_id step_index event channel label cycle step time_s reason_kind reason_name doc".split()
    ),
    "impedance": frozenset("run_id seq i frequency_hz z_real_ohm z_imag_ohm".split()),
    "anomalies": frozenset("run_id cell kind time_s detected_time_s step cycle action message doc".split()),
    "cell_states": frozenset("cell run_id time_s doc".split()),
}
_SCHEMA_1_FIRST_TABLES = ("runs", "batches", "samples", "step_events")


class StoreError(ValueError):
    """A store labtwin cannot use; the message is one line naming the database and the fix."""


class SchemaError(StoreError):
    """A store whose schema this labtwin cannot use as it is (too new, read-only and old, not labtwin's)."""


def _first_line(exc: DBAPIError) -> str:
    return (str(exc.orig) if exc.orig is not None else str(exc)).strip().splitlines()[0]


def _script() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head_version() -> int:
    """The schema version this labtwin writes."""
    head = _script().get_current_head()
    assert head is not None
    return int(head)


def alembic_config(conn: Connection) -> Config:
    """Alembic's configuration, built in code, to run the shipped migrations on ``conn`` (and its transaction)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def _found_version(conn: Connection, where: str) -> int | None:
    """The database's schema version; None when it holds no labtwin tables yet."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(found) == 1:
            if not str(found[0]).isdigit():
                raise SchemaError(f"{where} is at schema revision {found[0]!r}, not one labtwin made")
            return int(found[0])
    ours = tables & SCHEMA_1_COLUMNS.keys()
    if not ours:
        return None
    _check_schema_1(conn, where, ours)
    return 1


def _check_schema_1(conn: Connection, where: str, present: set[str]) -> None:
    """Only a database whose tables are exactly labtwin 0.1's is adopted as schema 1."""
    missing = [t for t in _SCHEMA_1_FIRST_TABLES if t not in present]
    if missing:
        raise SchemaError(
            f"{where} has some of labtwin's tables but not {', '.join(missing)} and no schema version: "
            "it is not a labtwin store; point --store at another database"
        )
    inspector = inspect(conn)
    for table in sorted(present):
        columns = {c["name"] for c in inspector.get_columns(table)}
        if columns != SCHEMA_1_COLUMNS[table]:
            odd = sorted(columns ^ SCHEMA_1_COLUMNS[table])
            raise SchemaError(
                f"{where}: table {table} differs from labtwin 0.1's (columns {', '.join(odd)}) and the database "
                "has no schema version: it was changed outside labtwin; point --store at another database"
            )


def _too_new(where: str, found: int, head: int) -> SchemaError:
    return SchemaError(
        f"{where} is at schema {found}, newer than this labtwin knows (up to {head}): upgrade labtwin "
        "(pip install -U labtwin) to open it"
    )


def _read(engine: Engine, where: str) -> int | None:
    with engine.connect() as conn:
        found = _found_version(conn, where)
        conn.rollback()
    return found


def _migrate(engine: Engine, where: str) -> tuple[int | None, int]:
    """Upgrade to the newest schema under the database's write lock; (version before, version after)."""
    head = head_version()
    try:
        with engine.connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
                found = _found_version(conn, where)  # again: another process may have migrated meanwhile
                if found is not None and found > head:
                    raise _too_new(where, found, head)
                if found != head:
                    command.upgrade(alembic_config(conn), "head")
    except DBAPIError as exc:
        raise SchemaError(
            f"cannot migrate {where} to schema {head} ({_first_line(exc)}): run `labtwin db upgrade --store URL` "
            "as a user who may write to it"
        ) from None
    return found, head


def ensure_current(engine: Engine, where: StoreURL, *, writable: bool) -> int:
    """What ``Store.open`` calls: the database at the newest schema, or a SchemaError saying what to do.

    The common case (already current) takes no write lock, so readers never queue behind the recorder.
    """
    shown = describe_url(where.text)
    head = head_version()
    try:
        found = _read(engine, shown)
    except DBAPIError as exc:
        raise StoreError(f"cannot open the store {shown} ({_first_line(exc)})") from None
    if found == head:
        return head
    if found is not None and found > head:
        raise _too_new(shown, found, head)
    if not writable:
        state = "holds no labtwin tables yet" if found is None else f"is at schema {found}"
        raise SchemaError(
            f"{shown} {state}, this labtwin needs schema {head}, and it is read-only here: "
            f"run `labtwin db upgrade --store {shown}` where it is writable"
        )
    before, after = _migrate(engine, shown)
    if before is not None and before != after:
        log.warning("migrated %s from schema %d to %d", shown, before, after)
    return after


def current(url: str | Path | None) -> int | None:
    """The schema version of the store at ``url``; None when it holds no labtwin tables (or no file) yet."""
    where = parse_url(url)
    if where.path is not None and not where.path.exists():
        return None
    engine = make_engine(where, read_only=where.is_sqlite)
    try:
        return _read(engine, describe_url(where.text))
    except DBAPIError as exc:
        raise StoreError(f"cannot read the store {describe_url(where.text)} ({_first_line(exc)})") from None
    finally:
        engine.dispose()


def upgrade(url: str | Path | None) -> tuple[int | None, int]:
    """Migrate the store at ``url`` to the newest schema (creating it when empty); (version before, after)."""
    where = parse_url(url)
    engine = make_engine(where)
    try:
        shown = describe_url(where.text)
        before, after = _migrate(engine, shown)
    finally:
        engine.dispose()
    if before is not None and before != after:
        log.warning("migrated %s from schema %d to %d", shown, before, after)
    return before, after
