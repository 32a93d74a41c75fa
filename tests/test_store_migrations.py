"""A lab's database outlives labtwin releases: older stores are migrated and read back unchanged.

"labtwin 0.1" below is the store before SQLAlchemy and Alembic (labtwin/data/store.py at commit ec2bf7d): its
CREATE TABLE statements and INSERTs are copied here verbatim, run through the bare DB-API as that code did, so
these tests open databases exactly as 0.1 left them, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import REAL, Float, inspect

from labtwin.data import migrate
from labtwin.data.migrate import SchemaError
from labtwin.data.schema import metadata
from labtwin.data.store import Store
from labtwin.documents import Anomaly, CellState, RunStart, RunStop, SampleBatch, StepEvent

HEAD = migrate.head_version()

# ---------------------------------------------------------------- labtwin 0.1's schema, verbatim

SAMPLE_COLUMNS_0_1 = (
    "time_s DOUBLE PRECISION, voltage_v DOUBLE PRECISION, current_a DOUBLE PRECISION, capacity_ah DOUBLE PRECISION, "
    "temperature_c DOUBLE PRECISION, step INTEGER, cycle INTEGER"
)
FIRST_TABLES_0_1 = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, lab TEXT, channel TEXT, cell_id TEXT, protocol TEXT, n_steps INTEGER,
        started_at TEXT, stopped_at TEXT, exit_status TEXT, reason TEXT,
        reported_samples INTEGER, reported_last_seq INTEGER, cell_time_s DOUBLE PRECISION,
        flow_run_id TEXT, start_doc TEXT, stop_doc TEXT)""",
    """CREATE TABLE IF NOT EXISTS batches (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (run_id, seq))""",
    "CREATE TABLE IF NOT EXISTS samples (run_id TEXT NOT NULL, seq INTEGER NOT NULL, i INTEGER NOT NULL, "
    + SAMPLE_COLUMNS_0_1
    + ")",
    "CREATE INDEX IF NOT EXISTS samples_run_seq ON samples (run_id, seq)",
    """CREATE TABLE IF NOT EXISTS step_events (
        run_id TEXT NOT NULL, step_index INTEGER NOT NULL, event TEXT NOT NULL, channel TEXT, label TEXT,
        cycle INTEGER, step TEXT, time_s DOUBLE PRECISION, reason_kind TEXT, reason_name TEXT, doc TEXT NOT NULL,
        PRIMARY KEY (run_id, step_index, event))""",
]
LATER_TABLES_0_1 = [  # added by later 0.1 commits (impedance, then the twin's findings)
    """CREATE TABLE IF NOT EXISTS impedance (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, i INTEGER NOT NULL, frequency_hz DOUBLE PRECISION,
        z_real_ohm DOUBLE PRECISION, z_imag_ohm DOUBLE PRECISION, PRIMARY KEY (run_id, seq, i))""",
    """CREATE TABLE IF NOT EXISTS anomalies (
        run_id TEXT NOT NULL, cell TEXT NOT NULL, kind TEXT NOT NULL, time_s DOUBLE PRECISION NOT NULL,
        detected_time_s DOUBLE PRECISION, step INTEGER, cycle INTEGER, action TEXT, message TEXT, doc TEXT NOT NULL,
        PRIMARY KEY (run_id, cell, kind, time_s))""",
    """CREATE TABLE IF NOT EXISTS cell_states (
        cell TEXT NOT NULL, run_id TEXT NOT NULL, time_s DOUBLE PRECISION NOT NULL, doc TEXT NOT NULL,
        PRIMARY KEY (cell, run_id, time_s))""",
]

# Documents as 0.1 serialised them (the JSON is literal: a later model change must still read it).
RUN_START = (
    '{"v":1,"kind":"run_start","run_id":"r-0.1-a","lab":"lab1","channel":"ch1","cell_id":"LTO-7",'
    '"protocol":"cycle_1C","n_steps":2,"time":"2026-03-02T09:15:00Z","columns":[{"name":"time_s","unit":"s",'
    '"description":"cell time since the run started"},{"name":"voltage_V","unit":"V","description":"terminal '
    'voltage"},{"name":"current_A","unit":"A","description":"positive charges the cell"},{"name":"capacity_Ah",'
    '"unit":"Ah","description":"net charge since run start, positive = charged in"},{"name":"temperature_C",'
    '"unit":"degC","description":"cell temperature"},{"name":"step","unit":"1","description":"index in the '
    'compiled step list"},{"name":"cycle","unit":"1","description":"cycle number from the protocol"}],'
    '"sign_convention":"positive current charges the cell","flow_run_id":"f-1","metadata":{}}'
)
RUN_STOP = (
    '{"v":1,"kind":"run_stop","run_id":"r-0.1-a","channel":"ch1","exit_status":"success","reason":"done",'
    '"time":"2026-03-02T10:15:00Z","n_samples":5,"n_batches":2,"last_seq":1,"cell_time_s":3600.0}'
)
STEP_ENDED = (
    '{"v":1,"kind":"step_event","run_id":"r-0.1-a","channel":"ch1","step_index":0,"label":"rest","cycle":1,'
    '"step":"rest","event":"ended","time_s":1800.0,"wall_time":"2026-03-02T09:15:00Z","reason":{"kind":'
    '"end_condition","name":"time_s","value":1800.0,"threshold":1800.0,"message":""},"stats":null}'
)
ANOMALY = (
    '{"v":1,"kind":"impedance_growth","cell":"LTO-7","lab":"lab1","channel":"ch1","run_id":"r-0.1-a",'
    '"time_s":3000.0,"detected_time_s":3100.0,"cycle":1,"step":1,"message":"R grew 30 %","figures":{},'
    '"action":"notify","wall_time":"2026-03-02T10:15:00Z"}'
)
CELL_STATE = (
    '{"v":1,"cell":"LTO-7","lab":"lab1","channel":"ch1","run_id":"r-0.1-a","model":"lto_bare_thinfilm",'
    '"time_s":3000.0,"cycle":1,"step":1,"soc":0.5,"voltage_V":1.55,"anomalies":0,'
    '"wall_time":"2026-03-02T10:15:00Z"}'
)

# (seq, i, time_s, voltage_V, current_A, capacity_Ah, temperature_C, step, cycle)
SAMPLES = [
    (0, 0, 0.0, 1.55, 0.0, 0.0, 25.0, 0, 1),
    (0, 1, 900.0, 1.56, 0.0, 0.0, 25.1, 0, 1),
    (1, 0, 1800.0, 1.50, -1e-3, -1e-6, 25.2, 1, 1),
    (1, 1, 2700.0, 1.48, -1e-3, -2.5e-4, None, 1, 1),
    (1, 2, 3600.0, 1.40, -1e-3, -5e-4, 25.4, 1, 1),
]
IMPEDANCE = [(1, 0, 1000.0, 0.5, -0.1), (1, 1, 100.0, 0.6, -0.3), (1, 2, 10.0, 0.9, -0.2)]


def make_store_0_1(conn: Any, ph: str, *, later_tables: bool = True) -> None:
    """A database as labtwin 0.1 made and filled it (``ph``: the driver's placeholder, as 0.1's ``_sql``)."""
    cur = conn.cursor()
    for statement in FIRST_TABLES_0_1 + (LATER_TABLES_0_1 if later_tables else []):
        cur.execute(statement)

    def run(sql: str, rows: list[tuple[Any, ...]]) -> None:
        cur.executemany(sql.replace("?", ph), rows)

    run(
        "INSERT INTO runs (run_id, lab, channel, cell_id, protocol, n_steps, started_at, flow_run_id, start_doc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [("r-0.1-a", "lab1", "ch1", "LTO-7", "cycle_1C", 2, "2026-03-02T09:15:00+00:00", "f-1", RUN_START)],
    )
    run(
        "UPDATE runs SET stopped_at = ?, exit_status = ?, reason = ?, reported_samples = ?, reported_last_seq = ?, "
        "cell_time_s = ?, stop_doc = ? WHERE run_id = ?",
        [("2026-03-02T10:15:00+00:00", "success", "done", 5, 1, 3600.0, RUN_STOP, "r-0.1-a")],
    )
    run("INSERT INTO batches (run_id, seq, n) VALUES (?, ?, ?)", [("r-0.1-a", 0, 2), ("r-0.1-a", 1, 3)])
    run(
        "INSERT INTO samples (run_id, seq, i, time_s, voltage_v, current_a, capacity_ah, temperature_c, step, cycle) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [("r-0.1-a", *row) for row in SAMPLES],
    )
    run(
        "INSERT INTO step_events (run_id, step_index, event, channel, label, cycle, step, time_s, reason_kind, "
        "reason_name, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [("r-0.1-a", 0, "ended", "ch1", "rest", 1, "rest", 1800.0, "end_condition", "time_s", STEP_ENDED)],
    )
    if later_tables:
        run(
            "INSERT INTO impedance (run_id, seq, i, frequency_hz, z_real_ohm, z_imag_ohm) VALUES (?, ?, ?, ?, ?, ?)",
            [("r-0.1-a", *row) for row in IMPEDANCE],
        )
        run(
            "INSERT INTO anomalies (run_id, cell, kind, time_s, detected_time_s, step, cycle, action, message, doc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [("r-0.1-a", "LTO-7", "impedance_growth", 3000.0, 3100.0, 1, 1, "notify", "R grew 30 %", ANOMALY)],
        )
        run(
            "INSERT INTO cell_states (cell, run_id, time_s, doc) VALUES (?, ?, ?, ?)",
            [("LTO-7", "r-0.1-a", 3000.0, CELL_STATE)],
        )
    conn.commit()


TABLES = ("runs", "batches", "samples", "step_events", "impedance", "anomalies", "cell_states")
ORDER = {
    "runs": "run_id",
    "batches": "run_id, seq",
    "samples": "run_id, seq, i",
    "step_events": "run_id, step_index, event",
    "impedance": "run_id, seq, i",
    "anomalies": "run_id, cell, kind, time_s",
    "cell_states": "cell, run_id, time_s",
}


def dump(conn: Any, tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every labtwin table in the columns 0.1 wrote, through the bare driver: what 'unchanged' is
    checked against (columns later schemas added, such as batches.digest, are checked by their own tests)."""
    cur = conn.cursor()
    out = {}
    for table in tables:
        columns = ", ".join(sorted(migrate.SCHEMA_1_COLUMNS[table]))
        cur.execute(f"SELECT {columns} FROM {table} ORDER BY {ORDER[table]}")
        out[table] = [tuple(r) for r in cur.fetchall()]
    return out


# ---------------------------------------------------------------- one 0.1 database per backend


class Old:
    """A labtwin 0.1 store on one backend: its URL and a bare driver connection to look inside."""

    def __init__(self, url: str, connect: Callable[[], Any], ph: str) -> None:
        self.url, self.connect, self.ph = url, connect, ph

    def make(self, *, later_tables: bool = True) -> None:
        conn = self.connect()
        try:
            make_store_0_1(conn, self.ph, later_tables=later_tables)
        finally:
            conn.close()

    def dump(self, tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
        conn = self.connect()
        try:
            return dump(conn, tables)
        finally:
            conn.close()

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(statement)
            rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
            conn.commit()
            return rows
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def old(request, tmp_path) -> Iterator[Old]:
    if request.param == "sqlite":
        path = tmp_path / "labtwin-0.1.db"

        def connect_sqlite() -> sqlite3.Connection:
            conn = sqlite3.connect(str(path))
            conn.execute("PRAGMA journal_mode=WAL")
            return conn

        yield Old(str(path), connect_sqlite, "?")
    else:
        url = request.getfixturevalue("postgres_url")
        import psycopg

        yield Old(url, lambda: psycopg.connect(url), "%s")


def schema_differences(store: Store) -> list[Any]:
    """What Alembic's autogenerate would still change: nothing, when migrations and schema.py agree."""
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": _same_float_on_sqlite})
        return compare_metadata(context, metadata)


def _same_float_on_sqlite(context: Any, _inspected: Any, _column: Any, inspected_type: Any, metadata_type: Any):
    """SQLite reflects a DOUBLE PRECISION column (its DDL says so) as REAL: one 8-byte float type there."""
    if context.dialect.name == "sqlite" and isinstance(inspected_type, REAL) and isinstance(metadata_type, Float):
        return False
    return None  # Alembic's own comparison


# ---------------------------------------------------------------- the tests


def test_a_0_1_store_is_migrated_on_open_and_reads_back_unchanged(old, caplog):
    old.make()
    before = old.dump()
    assert migrate.current(old.url) == 1  # recognised by its tables, though it has no version yet

    with caplog.at_level(logging.WARNING, logger="labtwin.data.migrate"):
        store = Store.open(old.url)
    try:
        migrated = [r.getMessage() for r in caplog.records if "migrated" in r.getMessage()]
        assert len(migrated) == 1 and migrated[0].endswith(f"from schema 1 to {HEAD}")
        assert store.schema_version() == HEAD == migrate.current(old.url)
        assert old.dump() == before  # every row of every table, as 0.1 wrote it

        (run,) = store.runs()
        assert (run.run_id, run.cell_id, run.protocol, run.exit_status) == ("r-0.1-a", "LTO-7", "cycle_1C", "success")
        assert (run.stored_samples, run.reported_samples, run.cell_time_s) == (5, 5, 3600.0)
        assert store.find_run("r-0.1") == "r-0.1-a"
        data = store.samples("r-0.1-a")
        assert list(data["time_s"]) == [row[2] for row in SAMPLES]
        assert list(data["capacity_Ah"]) == [row[5] for row in SAMPLES]
        assert np.isnan(data["temperature_C"][3]) and data["temperature_C"][4] == 25.4
        assert list(data["cycle"]) == [1] * 5 and list(data["step"]) == [0, 0, 1, 1, 1]
        z = store.impedance("r-0.1-a")
        assert list(z["frequency_Hz"]) == [1000.0, 100.0, 10.0] and list(z["time_s"]) == [1800.0, 2700.0, 3600.0]
        assert store.seqs("r-0.1-a") == [0, 1] and store.sample_count("r-0.1-a") == 5
        assert store.step_events("r-0.1-a") == [StepEvent.model_validate_json(STEP_ENDED)]
        assert store.run_documents("r-0.1-a") == (
            RunStart.model_validate_json(RUN_START),
            RunStop.model_validate_json(RUN_STOP),
        )
        assert store.anomalies(cell="LTO-7") == [Anomaly.model_validate_json(ANOMALY)]
        assert store.cell_states("LTO-7") == [CellState.model_validate_json(CELL_STATE)]

        # and it goes on recording: a re-delivered 0.1 batch is still a duplicate, a new one is stored
        counts = store.write([_stored_0_1_batch(seq=1), _batch(seq=2, n=4)])
        assert (counts.batches, counts.duplicate_batches, counts.samples, counts.conflicts) == (1, 1, 4, 0)
        assert store.seqs("r-0.1-a") == [0, 1, 2] and store.sample_count("r-0.1-a") == 9
        assert schema_differences(store) == []
    finally:
        store.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="labtwin.data.migrate"):
        Store.open(old.url).close()  # current now: no second migration, no log line
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]


def test_an_early_0_1_store_gets_the_tables_0_1_added_later(old):
    old.make(later_tables=False)
    before = old.dump(("runs", "batches", "samples", "step_events"))
    store = Store.open(old.url)
    try:
        assert store.schema_version() == HEAD
        assert old.dump(("runs", "batches", "samples", "step_events")) == before
        assert store.anomalies() == [] and len(store.impedance("r-0.1-a")["frequency_Hz"]) == 0
        assert schema_differences(store) == []
    finally:
        store.close()


def test_a_new_store_is_made_at_the_current_schema_and_matches_schema_py(old):
    assert migrate.current(old.url) is None
    store = Store.open(old.url)
    try:
        assert store.schema_version() == HEAD
        assert schema_differences(store) == []
        names = {ix["name"] for ix in inspect(store.engine).get_indexes("samples")}
        assert "samples_run_seq_i" in names and "samples_run_seq" not in names
    finally:
        store.close()


def test_a_store_newer_than_this_labtwin_is_refused_with_one_line(old):
    Store.open(old.url).close()
    old.sql("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(SchemaError) as refused:
        Store.open(old.url)
    message = str(refused.value)
    assert "\n" not in message
    assert "schema 99" in message and f"up to {HEAD}" in message and "upgrade labtwin" in message
    assert ("labtwin-0.1.db" in message) if old.ph == "?" else ("postgresql://***@127.0.0.1" in message)
    with pytest.raises(SchemaError, match="upgrade labtwin"):
        migrate.upgrade(old.url)
    assert migrate.current(old.url) == 99  # left as it was


def test_a_read_only_0_1_store_is_not_touched_and_the_error_says_how_to_migrate(old):
    old.make()
    before = old.dump()
    with pytest.raises(SchemaError) as refused:
        Store.open(old.url, read_only=True)
    message = str(refused.value)
    assert "\n" not in message and "is at schema 1" in message and "read-only" in message
    assert "run `labtwin db upgrade --store " in message
    assert old.dump() == before and migrate.current(old.url) == 1  # no alembic_version written

    assert migrate.upgrade(old.url) == (1, HEAD)
    assert migrate.upgrade(old.url) == (HEAD, HEAD)
    store = Store.open(old.url, read_only=True)
    try:
        assert store.sample_count("r-0.1-a") == 5
    finally:
        store.close()


def test_a_migration_the_database_refuses_leaves_it_at_schema_1(old):
    """PostgreSQL in read-only transactions (as on a hot standby): the one-line error, and nothing changed."""
    if old.ph == "?":
        pytest.skip("SQLite has no read-only transactions; its read-only file is the read_only=True test above")
    old.make()
    before = old.dump()
    url = old.url + "%20-cdefault_transaction_read_only%3Don"
    with pytest.raises(SchemaError) as refused:
        migrate.upgrade(url)
    message = str(refused.value)
    assert "\n" not in message and "cannot migrate postgresql://***@127.0.0.1:5432/postgres" in message
    assert "read-only transaction" in message and "labtwin db upgrade --store URL" in message
    assert old.dump() == before and migrate.current(old.url) == 1


def test_a_table_changed_by_hand_is_not_adopted(old):
    old.make()
    old.sql("ALTER TABLE samples ADD COLUMN note TEXT")
    with pytest.raises(SchemaError, match="table samples differs from labtwin 0.1's .columns note."):
        Store.open(old.url)


def test_the_migrations_go_down_and_up_again(old):
    old.make()
    Store.open(old.url).close()
    store = Store.open(old.url)
    try:
        with store.engine.connect() as conn:
            with conn.begin():
                command.downgrade(migrate.alembic_config(conn), "0001")
        assert migrate.current(old.url) == 1
        names = {ix["name"] for ix in inspect(store.engine).get_indexes("samples")}
        assert names == {"samples_run_seq"}
        assert migrate.upgrade(old.url) == (1, HEAD)
        assert schema_differences(store) == []
        assert store.sample_count("r-0.1-a") == 5
    finally:
        store.close()


def test_four_openers_of_an_old_sqlite_store_at_once_migrate_it_once(tmp_path, caplog):
    path = tmp_path / "shared.db"
    conn = sqlite3.connect(str(path))
    make_store_0_1(conn, "?")
    conn.close()
    opened: list[int] = []
    errors: list[BaseException] = []
    go = threading.Barrier(4)

    def open_it() -> None:
        try:
            go.wait()
            store = Store.open(path)
            opened.append(store.schema_version())
            store.close()
        except BaseException as exc:  # reported below, from the test thread
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="labtwin.data.migrate"):
        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and opened == [HEAD] * 4
    assert len([r for r in caplog.records if "migrated" in r.getMessage()]) == 1


def test_store_urls_users_type_today_still_open(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("plain.db", str(tmp_path / "abs.db"), "sqlite:///rel.db", f"sqlite:///{tmp_path}/abs2.db"):
        store = Store.open(url)
        store.close()
    assert {p.name for p in Path(tmp_path).glob("*.db")} == {"plain.db", "abs.db", "rel.db", "abs2.db"}
    with pytest.raises(ValueError, match="SQLite file or postgresql://"):
        Store.open("mysql://u@h/db")


def _stored_0_1_batch(seq: int) -> SampleBatch:
    """The batch 0.1 stored as ``seq`` (SAMPLES and IMPEDANCE above), as its agent would send it again."""
    rows = [row[2:] for row in SAMPLES if row[0] == seq]
    points = [row[2:] for row in IMPEDANCE if row[0] == seq]
    names = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")
    z_names = ("frequency_Hz", "z_real_ohm", "z_imag_ohm")
    z = {name: [p[k] for p in points] for k, name in enumerate(z_names)} if points else {}
    columns = {name: [row[k] for row in rows] for k, name in enumerate(names)}
    return SampleBatch(run_id="r-0.1-a", channel="ch1", seq=seq, **columns, **z)


def _batch(seq: int, n: int) -> SampleBatch:
    return SampleBatch(
        run_id="r-0.1-a",
        channel="ch1",
        seq=seq,
        time_s=[3600.0 + 10.0 * k for k in range(n)],
        voltage_V=[1.4] * n,
        current_A=[-1e-3] * n,
        capacity_Ah=[-5e-4] * n,
        temperature_C=[25.0] * n,
        step=[1] * n,
        cycle=[1] * n,
    )


def test_labtwin_db_current_and_upgrade_migrate_an_old_store_from_the_command_line(old):
    """The fix the read-only error names works as a command: `db current` reports, `db upgrade` migrates."""
    from typer.testing import CliRunner

    from labtwin.cli import app

    old.make()
    before = old.dump()
    runner = CliRunner()
    current = runner.invoke(app, ["db", "current", "--store", old.url, "--json"])
    assert current.exit_code == 0, current.output
    assert json.loads(current.output) | {"store": None} == {"store": None, "schema_version": 1, "newest_known": HEAD}
    assert old.dump() == before  # asking changes nothing

    upgraded = runner.invoke(app, ["db", "upgrade", "--store", old.url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema 1 -> {HEAD}" in upgraded.output
    assert migrate.current(old.url) == HEAD
    again = runner.invoke(app, ["db", "upgrade", "--store", old.url])
    assert again.exit_code == 0 and f"already at schema {HEAD}" in again.output
