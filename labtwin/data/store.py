"""The run store: SQLite by default (a file under ./labtwin-data/), PostgreSQL for a lab.

One schema for both. Writes are idempotent: a sample batch is keyed on
(run_id, seq) and a step event on (run_id, step_index, event), because QoS 1
delivers at least once and a reconnecting publisher re-sends. A batch is
inserted with its samples in one transaction, so a crash never leaves half a
batch.

Column names in SQL are lower case (PostgreSQL folds unquoted names);
``SAMPLE_FIELDS`` maps them to labtwin's unit-bearing names.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from labtwin.documents import Anomaly, CellState, RunStart, RunStop, SampleBatch, StepEvent

DEFAULT_SQLITE = Path("labtwin-data") / "labtwin.db"

# (model field, SQL column, SQL type)
SAMPLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("time_s", "time_s", "DOUBLE PRECISION"),
    ("voltage_V", "voltage_v", "DOUBLE PRECISION"),
    ("current_A", "current_a", "DOUBLE PRECISION"),
    ("capacity_Ah", "capacity_ah", "DOUBLE PRECISION"),
    ("temperature_C", "temperature_c", "DOUBLE PRECISION"),
    ("step", "step", "INTEGER"),
    ("cycle", "cycle", "INTEGER"),
)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY, lab TEXT, channel TEXT, cell_id TEXT, protocol TEXT, n_steps INTEGER,
        started_at TEXT, stopped_at TEXT, exit_status TEXT, reason TEXT,
        reported_samples INTEGER, reported_last_seq INTEGER, cell_time_s DOUBLE PRECISION,
        flow_run_id TEXT, start_doc TEXT, stop_doc TEXT)""",
    """CREATE TABLE IF NOT EXISTS batches (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (run_id, seq))""",
    "CREATE TABLE IF NOT EXISTS samples (run_id TEXT NOT NULL, seq INTEGER NOT NULL, i INTEGER NOT NULL, "
    + ", ".join(f"{col} {typ}" for _, col, typ in SAMPLE_FIELDS)
    + ")",
    "CREATE INDEX IF NOT EXISTS samples_run_seq ON samples (run_id, seq)",
    """CREATE TABLE IF NOT EXISTS impedance (
        run_id TEXT NOT NULL, seq INTEGER NOT NULL, i INTEGER NOT NULL, frequency_hz DOUBLE PRECISION,
        z_real_ohm DOUBLE PRECISION, z_imag_ohm DOUBLE PRECISION, PRIMARY KEY (run_id, seq, i))""",
    """CREATE TABLE IF NOT EXISTS step_events (
        run_id TEXT NOT NULL, step_index INTEGER NOT NULL, event TEXT NOT NULL, channel TEXT, label TEXT,
        cycle INTEGER, step TEXT, time_s DOUBLE PRECISION, reason_kind TEXT, reason_name TEXT, doc TEXT NOT NULL,
        PRIMARY KEY (run_id, step_index, event))""",
    # The twin's findings: one row per anomaly (keyed so a re-delivered message is stored once) and the
    # cell states it published, for trends of SOC, resistances and capacity after the fact.
    """CREATE TABLE IF NOT EXISTS anomalies (
        run_id TEXT NOT NULL, cell TEXT NOT NULL, kind TEXT NOT NULL, time_s DOUBLE PRECISION NOT NULL,
        detected_time_s DOUBLE PRECISION, step INTEGER, cycle INTEGER, action TEXT, message TEXT, doc TEXT NOT NULL,
        PRIMARY KEY (run_id, cell, kind, time_s))""",
    """CREATE TABLE IF NOT EXISTS cell_states (
        cell TEXT NOT NULL, run_id TEXT NOT NULL, time_s DOUBLE PRECISION NOT NULL, doc TEXT NOT NULL,
        PRIMARY KEY (cell, run_id, time_s))""",
]

_INSERT_SAMPLES = (
    "INSERT INTO samples (run_id, seq, i, "
    + ", ".join(col for _, col, _ in SAMPLE_FIELDS)
    + ") VALUES (?, ?, ?, "
    + ", ".join("?" for _ in SAMPLE_FIELDS)
    + ")"
)


@dataclass
class RunRow:
    run_id: str
    lab: str | None
    channel: str | None
    cell_id: str | None
    protocol: str | None
    started_at: str | None
    stopped_at: str | None
    exit_status: str | None
    reason: str | None
    reported_samples: int | None
    stored_samples: int
    cell_time_s: float | None


@dataclass
class WriteCounts:
    batches: int = 0
    duplicate_batches: int = 0
    samples: int = 0
    events: int = 0


class Store:
    """A DB-API connection with labtwin's schema. Use ``Store.open(url)``."""

    placeholder = "?"

    def __init__(self, conn, url: str) -> None:
        self.conn = conn
        self.url = url
        self._lock = threading.Lock()
        self._create()

    # ------------------------------------------------------------------ opening

    @staticmethod
    def open(url: str | Path | None = None) -> Store:
        """``None`` or a path: SQLite; ``postgresql://...``: PostgreSQL (needs labtwin[postgres])."""
        text = str(url) if url is not None else str(DEFAULT_SQLITE)
        if text.startswith(("postgresql://", "postgres://")):
            return PostgresStore.connect(text)
        if text.startswith("sqlite:///"):
            text = text[len("sqlite:///") :]
        return SQLiteStore.connect(Path(text))

    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _create(self) -> None:
        with self._lock:
            cur = self.conn.cursor()
            for statement in SCHEMA:
                cur.execute(statement)
            self.conn.commit()

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------------ writing

    def write(self, documents: Iterable[BaseModel]) -> WriteCounts:
        """Store documents in one transaction; duplicates (same keys) are ignored."""
        counts = WriteCounts()
        with self._lock:
            cur = self.conn.cursor()
            try:
                for doc in documents:
                    if isinstance(doc, SampleBatch):
                        self._write_batch(cur, doc, counts)
                    elif isinstance(doc, StepEvent):
                        self._write_step_event(cur, doc, counts)
                    elif isinstance(doc, RunStart):
                        self._write_run_start(cur, doc)
                        counts.events += 1
                    elif isinstance(doc, RunStop):
                        self._write_run_stop(cur, doc)
                        counts.events += 1
                    elif isinstance(doc, Anomaly):
                        cur.execute(
                            self._sql(
                                "INSERT INTO anomalies (run_id, cell, kind, time_s, detected_time_s, step, cycle, action, message, doc) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
                            ),
                            (
                                doc.run_id,
                                doc.cell,
                                doc.kind,
                                doc.time_s,
                                doc.detected_time_s,
                                doc.step,
                                doc.cycle,
                                doc.action,
                                doc.message,
                                doc.model_dump_json(),
                            ),
                        )
                        counts.events += 1
                    elif isinstance(doc, CellState):
                        cur.execute(
                            self._sql(
                                "INSERT INTO cell_states (cell, run_id, time_s, doc) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
                            ),
                            (doc.cell, doc.run_id, doc.time_s, doc.model_dump_json()),
                        )
                self.conn.commit()
            except BaseException:
                self.conn.rollback()
                raise
        return counts

    def _write_batch(self, cur, batch: SampleBatch, counts: WriteCounts) -> None:
        n = len(batch.time_s)
        cur.execute(
            self._sql("INSERT INTO batches (run_id, seq, n) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"),
            (batch.run_id, batch.seq, n),
        )
        if cur.rowcount != 1:
            counts.duplicate_batches += 1
            return
        rows = list(
            zip(
                [batch.run_id] * n,
                [batch.seq] * n,
                range(n),
                batch.time_s,
                batch.voltage_V,
                batch.current_A,
                batch.capacity_Ah,
                batch.temperature_C,
                batch.step,
                batch.cycle,
            )
        )
        cur.executemany(self._sql(_INSERT_SAMPLES), rows)
        if batch.frequency_Hz is not None:
            cur.executemany(
                self._sql(
                    "INSERT INTO impedance (run_id, seq, i, frequency_hz, z_real_ohm, z_imag_ohm) VALUES (?, ?, ?, ?, ?, ?)"
                ),
                list(
                    zip(
                        [batch.run_id] * n,
                        [batch.seq] * n,
                        range(n),
                        batch.frequency_Hz,
                        batch.z_real_ohm,
                        batch.z_imag_ohm,
                    )
                ),
            )
        counts.batches += 1
        counts.samples += n

    def _write_step_event(self, cur, ev: StepEvent, counts: WriteCounts) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO step_events (run_id, step_index, event, channel, label, cycle, step, time_s, "
                "reason_kind, reason_name, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
            ),
            (
                ev.run_id,
                ev.step_index,
                ev.event,
                ev.channel,
                ev.label,
                ev.cycle,
                ev.step.value,
                ev.time_s,
                ev.reason.kind if ev.reason else None,
                ev.reason.name if ev.reason else None,
                ev.model_dump_json(),
            ),
        )
        counts.events += cur.rowcount == 1

    def _write_run_start(self, cur, doc: RunStart) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO runs (run_id, lab, channel, cell_id, protocol, n_steps, started_at, flow_run_id, start_doc) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET lab = excluded.lab, "
                "channel = excluded.channel, cell_id = excluded.cell_id, protocol = excluded.protocol, "
                "n_steps = excluded.n_steps, started_at = excluded.started_at, flow_run_id = excluded.flow_run_id, "
                "start_doc = excluded.start_doc"
            ),
            (
                doc.run_id,
                doc.lab,
                doc.channel,
                doc.cell_id,
                doc.protocol,
                doc.n_steps,
                doc.time.isoformat(),
                doc.flow_run_id,
                doc.model_dump_json(),
            ),
        )

    def _write_run_stop(self, cur, doc: RunStop) -> None:
        cur.execute(
            self._sql(
                "INSERT INTO runs (run_id, channel, stopped_at, exit_status, reason, reported_samples, "
                "reported_last_seq, cell_time_s, stop_doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id) DO UPDATE SET stopped_at = excluded.stopped_at, "
                "exit_status = excluded.exit_status, reason = excluded.reason, "
                "reported_samples = excluded.reported_samples, reported_last_seq = excluded.reported_last_seq, "
                "cell_time_s = excluded.cell_time_s, stop_doc = excluded.stop_doc"
            ),
            (
                doc.run_id,
                doc.channel,
                doc.time.isoformat(),
                doc.exit_status,
                doc.reason,
                doc.n_samples,
                doc.last_seq,
                doc.cell_time_s,
                doc.model_dump_json(),
            ),
        )

    # ------------------------------------------------------------------ reading

    def runs(self) -> list[RunRow]:
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(
                "SELECT r.run_id, r.lab, r.channel, r.cell_id, r.protocol, r.started_at, r.stopped_at, r.exit_status, "
                "r.reason, r.reported_samples, COALESCE((SELECT SUM(b.n) FROM batches b WHERE b.run_id = r.run_id), 0), "
                "r.cell_time_s FROM runs r ORDER BY r.started_at"
            )
            return [RunRow(*row[:10], int(row[10]), row[11]) for row in cur.fetchall()]

    def find_run(self, prefix: str) -> str:
        """A run id from its full text or a unique prefix (as git does for commits)."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql("SELECT run_id FROM runs WHERE run_id LIKE ?"), (prefix + "%",))
            found = [r[0] for r in cur.fetchall()]
        if not found:
            raise KeyError(f"no run {prefix!r} in {self.url}: `labtwin runs` lists them")
        if len(found) > 1 and prefix not in found:
            raise KeyError(f"run prefix {prefix!r} is ambiguous: {', '.join(found[:5])}")
        return prefix if prefix in found else found[0]

    def samples(self, run_id: str) -> dict[str, np.ndarray]:
        """All samples of a run in order, as numpy columns named with their units."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(
                self._sql(
                    "SELECT "
                    + ", ".join(col for _, col, _ in SAMPLE_FIELDS)
                    + " FROM samples WHERE run_id = ? ORDER BY seq, i"
                ),
                (run_id,),
            )
            rows = cur.fetchall()
        data = np.array(rows, dtype=float).reshape(-1, len(SAMPLE_FIELDS))
        out = {name: data[:, k] for k, (name, _, _) in enumerate(SAMPLE_FIELDS)}
        out["step"] = out["step"].astype(int)
        out["cycle"] = out["cycle"].astype(int)
        return out

    def impedance(self, run_id: str) -> dict[str, np.ndarray]:
        """The impedance points of a run with the step and cycle they belong to, in measurement order."""
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(
                self._sql(
                    "SELECT z.frequency_hz, z.z_real_ohm, z.z_imag_ohm, s.step, s.cycle, s.time_s FROM impedance z "
                    "JOIN samples s ON s.run_id = z.run_id AND s.seq = z.seq AND s.i = z.i "
                    "WHERE z.run_id = ? ORDER BY z.seq, z.i"
                ),
                (run_id,),
            )
            rows = cur.fetchall()
        data = np.array(rows, dtype=float).reshape(-1, 6)
        names = ("frequency_Hz", "z_real_ohm", "z_imag_ohm", "step", "cycle", "time_s")
        out = {name: data[:, k] for k, name in enumerate(names)}
        out["step"] = out["step"].astype(int)
        out["cycle"] = out["cycle"].astype(int)
        return out

    def anomalies(self, run_id: str | None = None, cell: str | None = None) -> list[Anomaly]:
        """The twin's anomalies, oldest first, for a run and/or a cell (all when neither is given)."""
        where, args = [], []
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        if cell is not None:
            where.append("cell = ?")
            args.append(cell)
        sql = "SELECT doc FROM anomalies" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY time_s"
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql(sql), tuple(args))
            return [Anomaly.model_validate_json(row[0]) for row in cur.fetchall()]

    def cell_states(self, cell: str, run_id: str | None = None) -> list[CellState]:
        sql = (
            "SELECT doc FROM cell_states WHERE cell = ?"
            + (" AND run_id = ?" if run_id else "")
            + " ORDER BY run_id, time_s"
        )
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql(sql), (cell, run_id) if run_id else (cell,))
            return [CellState.model_validate_json(row[0]) for row in cur.fetchall()]

    def sample_count(self, run_id: str) -> int:
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql("SELECT COUNT(*) FROM samples WHERE run_id = ?"), (run_id,))
            return int(cur.fetchone()[0])

    def seqs(self, run_id: str) -> list[int]:
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql("SELECT seq FROM batches WHERE run_id = ? ORDER BY seq"), (run_id,))
            return [int(r[0]) for r in cur.fetchall()]

    def step_events(self, run_id: str, event: str | None = "ended") -> list[StepEvent]:
        with self._lock:
            cur = self.conn.cursor()
            if event is None:
                cur.execute(
                    self._sql("SELECT doc FROM step_events WHERE run_id = ? ORDER BY step_index, event DESC"), (run_id,)
                )
            else:
                cur.execute(
                    self._sql("SELECT doc FROM step_events WHERE run_id = ? AND event = ? ORDER BY step_index"),
                    (run_id, event),
                )
            return [StepEvent.model_validate_json(r[0]) for r in cur.fetchall()]

    def run_documents(self, run_id: str) -> tuple[RunStart | None, RunStop | None]:
        with self._lock:
            cur = self.conn.cursor()
            cur.execute(self._sql("SELECT start_doc, stop_doc FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
        if row is None:
            return None, None
        start = RunStart.model_validate_json(row[0]) if row[0] else None
        stop = RunStop.model_validate_json(row[1]) if row[1] else None
        return start, stop


class SQLiteStore(Store):
    @classmethod
    def connect(cls, path: Path) -> SQLiteStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return cls(conn, str(path))


class PostgresStore(Store):
    placeholder = "%s"

    @classmethod
    def connect(cls, url: str) -> PostgresStore:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError("PostgreSQL needs psycopg: pip install 'labtwin[postgres]'") from None
        conn = psycopg.connect(url)
        return cls(conn, url)


def describe_url(url: str | Path | None) -> str:
    text = str(url) if url is not None else str(DEFAULT_SQLITE)
    if "@" in text and "://" in text:  # hide a password
        scheme, rest = text.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return text
