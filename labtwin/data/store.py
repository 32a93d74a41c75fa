"""The run store: SQLite by default (a file under ./labtwin-data/), PostgreSQL for a lab.

One schema for both (``labtwin.data.schema``, SQLAlchemy Core), versioned and
migrated forward on open (``labtwin.data.migrate``). Writes are idempotent: a
sample batch is keyed on (run_id, seq) and a step event on (run_id,
step_index, event), because QoS 1 delivers at least once and a reconnecting
publisher re-sends. A batch row carries the digest of its samples
(``labtwin.data.digest``): a batch that comes again with the same samples is a
duplicate, one that reuses a stored (run_id, seq) with other samples is a
conflict, kept whole in ``batch_conflicts`` beside the stored batch, which
stays (the first to arrive is not always the true one, and a forger can send
first: neither is dropped unseen). A ``write`` is one transaction, so a crash
never leaves half a batch; its samples go to the database in one executemany,
which is what keeps the recorder ahead of a fast channel.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel
from sqlalchemy import Engine, Select, bindparam, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.pool import StaticPool

from labtwin.data import blocks, migrate
from labtwin.data.digest import FLOAT_COLUMNS, INT_COLUMNS, batch_digest, samples_digest
from labtwin.data.engine import DEFAULT_SQLITE, WRITE, describe_url, make_engine, parse_url
from labtwin.data.schema import (
    SAMPLE_FIELDS,
    anomalies,
    batch_conflicts,
    batches,
    cell_states,
    impedance,
    operator_actions,
    outages,
    runs,
    sample_blocks,
    samples,
    step_events,
)
from labtwin.documents import Anomaly, CellState, Outage, RunStart, RunStop, SampleBatch, StepEvent

__all__ = ["DEFAULT_SQLITE", "SAMPLE_FIELDS", "BatchConflict", "RunRow", "Store", "WriteCounts", "describe_url"]

_SAMPLE_COLUMNS = ("run_id", "seq", "i", *(col for _, col, _ in SAMPLE_FIELDS))
_COPY_SAMPLES = f"COPY samples ({', '.join(_SAMPLE_COLUMNS)}) FROM STDIN"
_COPY_MIN_ROWS = 50  # fewer: one INSERT costs less than a savepoint and a COPY
_IMPEDANCE_COLUMNS = ("run_id", "seq", "i", "frequency_hz", "z_real_ohm", "z_imag_ohm")
_CONFLICT_COLUMNS = tuple(c.name for c in batch_conflicts.columns)
_SQL_OF_FIELD = {name: col for name, col, _ in SAMPLE_FIELDS}
_STEP_EVENT_COLUMNS = tuple(c.name for c in step_events.columns)
_STEP_EVENT_KEY = ("run_id", "step_index", "event")
CUT_BY_RESTART = "agent_restart"  # EndReason.name of a step an agent restart cut (labtwin.agent.recovery)
_ANOMALY_COLUMNS = tuple(c.name for c in anomalies.columns)
_CELL_STATE_COLUMNS = ("cell", "run_id", "time_s", "doc")
_OUTAGE_COLUMNS = tuple(c.name for c in outages.columns)
_RUN_START_COLUMNS = ("lab", "channel", "cell_id", "protocol", "n_steps", "started_at", "flow_run_id", "start_doc")
_RUN_STOP_COLUMNS = (
    "stopped_at",
    "exit_status",
    "reason",
    "reported_samples",
    "reported_last_seq",
    "cell_time_s",
    "stop_doc",
)

log = logging.getLogger(__name__)


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
    conflicts: int = 0  # batches that came with this run's stored (run_id, seq) but other samples
    outages: int = 0  # stretches in which no agent read the instrument (an agent restart)
    outage_s: float = 0.0  # their cell time in total
    announced: bool = True  # False: samples stored under a run id no RunStart or RunStop named (a forgery?)


@dataclass
class BatchConflict:
    """A batch that reused a stored (run_id, seq) with other samples: the stored one stayed, this is the other."""

    run_id: str
    seq: int
    stored_digest: str
    incoming_digest: str
    n: int
    received_at: str  # ISO 8601, UTC
    batch: SampleBatch


@dataclass
class WriteCounts:
    batches: int = 0
    duplicate_batches: int = 0
    samples: int = 0
    events: int = 0
    conflicts: int = 0
    # (run_id, seq) of each conflict this write recorded, for the recorder's warning
    conflicting: list[tuple[str, int]] = field(default_factory=list)
    refused: int = 0  # documents naming a run of another channel
    refusing: list[tuple[str, str]] = field(default_factory=list)  # (run_id, the channel the document named)


class Store:
    """labtwin's tables in one database. Use ``Store.open(url)``; it is safe to share between threads."""

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self._run_channels: dict[str, str] = {}  # run_id -> the channel of its first RunStart (never changes)
        self._shared: AbstractContextManager[Any] = (
            threading.Lock() if isinstance(engine.pool, StaticPool) else nullcontext()
        )
        insert: Callable[..., Any] = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert

        def compiled(statement: Any, columns: Sequence[str]) -> _Compiled:
            return _Compiled.of(statement, columns, engine)

        self._insert_batch = compiled(insert(batches).on_conflict_do_nothing(), ("run_id", "seq", "n", "digest"))
        self._insert_conflict = compiled(insert(batch_conflicts).on_conflict_do_nothing(), _CONFLICT_COLUMNS)
        b, s, z = batches.c, samples.c, impedance.c
        self._select_digest = compiled(
            select(b.digest).where((b.run_id == bindparam("run_id")) & (b.seq == bindparam("seq"))),
            ("run_id", "seq"),
        )
        self._select_batch_samples = compiled(
            select(*(s[_SQL_OF_FIELD[name]] for name in (*FLOAT_COLUMNS, *INT_COLUMNS)))
            .where((s.run_id == bindparam("run_id")) & (s.seq == bindparam("seq")))
            .order_by(s.i),
            ("run_id", "seq"),
        )
        self._select_batch_impedance = compiled(
            select(z.frequency_hz, z.z_real_ohm, z.z_imag_ohm)
            .where((z.run_id == bindparam("run_id")) & (z.seq == bindparam("seq")))
            .order_by(z.i),
            ("run_id", "seq"),
        )
        self._insert_samples = compiled(insert(samples).on_conflict_do_nothing(), _SAMPLE_COLUMNS)
        self._insert_block = compiled(
            insert(sample_blocks).on_conflict_do_nothing(), ("run_id", "first_seq", "last_seq", "n", "data")
        )
        self._insert_impedance = compiled(insert(impedance).on_conflict_do_nothing(), _IMPEDANCE_COLUMNS)
        # A step's end is stored once, except the end an agent gave a step its restart cut (error:agent_restart):
        # a flow that resumes the run runs that step again, and its later end replaces the cut one (the cut stays
        # on the record as the run's outage, which names the step).
        new_event = insert(step_events)
        self._insert_step_event = compiled(
            new_event.on_conflict_do_update(
                index_elements=[step_events.c.run_id, step_events.c.step_index, step_events.c.event],
                set_={c: new_event.excluded[c] for c in _STEP_EVENT_COLUMNS if c not in _STEP_EVENT_KEY},
                # inline literals: the statement is run with plain rows of its columns (_Compiled), no other binds
                where=(step_events.c.reason_name == literal_column(f"'{CUT_BY_RESTART}'"))
                & (step_events.c.event == literal_column("'ended'")),
            ),
            _STEP_EVENT_COLUMNS,
        )
        self._insert_anomaly = compiled(insert(anomalies).on_conflict_do_nothing(), _ANOMALY_COLUMNS)
        self._insert_cell_state = compiled(insert(cell_states).on_conflict_do_nothing(), _CELL_STATE_COLUMNS)
        self._insert_outage = compiled(insert(outages).on_conflict_do_nothing(), _OUTAGE_COLUMNS)
        self._select_samples = compiled(
            select(*(samples.c[col] for _, col, _ in SAMPLE_FIELDS))
            .where(samples.c.run_id == bindparam("run_id"))
            .order_by(samples.c.seq, samples.c.i),
            ("run_id",),
        )
        self._select_impedance = compiled(
            select(z.frequency_hz, z.z_real_ohm, z.z_imag_ohm, s.step, s.cycle, s.time_s)
            .join_from(impedance, samples, (s.run_id == z.run_id) & (s.seq == z.seq) & (s.i == z.i))
            .where(z.run_id == bindparam("run_id"))
            .order_by(z.seq, z.i),
            ("run_id",),
        )
        start, stop = insert(runs), insert(runs)
        self._upsert_run_start = compiled(
            # The record is the run's first start: a resumed run's later RunStart (or a RunStop that overtook the
            # start) only fills what is still empty, so started_at, the protocol and the export's time base stay.
            start.on_conflict_do_update(
                index_elements=[runs.c.run_id],
                set_={c: func.coalesce(runs.c[c], start.excluded[c]) for c in _RUN_START_COLUMNS},
            ),
            ("run_id", *_RUN_START_COLUMNS),
        )
        self._upsert_run_stop = compiled(
            stop.on_conflict_do_update(
                index_elements=[runs.c.run_id], set_={c: stop.excluded[c] for c in _RUN_STOP_COLUMNS}
            ),
            ("run_id", "channel", *_RUN_STOP_COLUMNS),
        )

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        """A connection; one at a time when the pool holds a single shared one (SQLite ``:memory:``)."""
        with self._shared, self.engine.connect() as conn:
            yield conn

    # ------------------------------------------------------------------ opening

    @staticmethod
    def open(url: str | Path | None = None, *, read_only: bool = False) -> Store:
        """``None``, a path or ``sqlite:///path``: SQLite; ``postgresql://...``: PostgreSQL (labtwin[postgres]).

        An older database is migrated to the current schema (one log line says so); one that cannot be
        (read-only, or newer than this labtwin) raises ``labtwin.data.migrate.SchemaError`` saying what to do.
        A SQLite file this process may not write is opened read-only.
        """
        where = parse_url(url)
        if where.path is not None and where.path.exists() and not os.access(where.path, os.W_OK):
            read_only = True
        engine = make_engine(where, read_only=read_only)
        try:
            migrate.ensure_current(engine, where, writable=not read_only)
        except BaseException:
            engine.dispose()
            raise
        return Store(engine, where.text)

    def schema_version(self) -> int:
        """The schema version of the database (``labtwin.data.migrate.head_version()`` once opened)."""
        with self._shared:
            version = migrate._read(self.engine, describe_url(self.url))
        assert version is not None
        return version

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ writing

    def write(self, documents: Iterable[BaseModel]) -> WriteCounts:
        """Store documents in one transaction; duplicates (same keys) are ignored, conflicting batches recorded."""
        counts = WriteCounts()
        sample_rows: list[tuple[Any, ...]] = []
        impedance_rows: list[tuple[Any, ...]] = []
        inserted: dict[str, list[SampleBatch]] = {}  # per run, the batches this write stored: its blocks
        with self._connect() as conn:
            conn.execution_options(**WRITE)
            with conn.begin():
                for doc in documents:
                    if isinstance(doc, (SampleBatch, StepEvent, RunStart, RunStop, Outage)) and not self._own_channel(
                        conn, doc
                    ):
                        counts.refused += 1
                        counts.refusing.append((doc.run_id, doc.channel))
                        continue
                    if isinstance(doc, SampleBatch):
                        if self._write_batch(conn, doc, counts, sample_rows, impedance_rows) and doc.time_s:
                            inserted.setdefault(doc.run_id, []).append(doc)
                    elif isinstance(doc, StepEvent):
                        counts.events += self._insert_step_event.run(conn, [_step_event_row(doc)]) == 1
                    elif isinstance(doc, RunStart):
                        self._upsert_run_start.run(conn, [_run_start_row(doc)])
                        counts.events += 1
                    elif isinstance(doc, RunStop):
                        self._upsert_run_stop.run(conn, [_run_stop_row(doc)])
                        counts.events += 1
                    elif isinstance(doc, Outage):
                        counts.events += self._insert_outage.run(conn, [_outage_row(doc)]) == 1
                    elif isinstance(doc, Anomaly):
                        self._insert_anomaly.run(conn, [_anomaly_row(doc)])
                        counts.events += 1
                    elif isinstance(doc, CellState):
                        row = (doc.cell, doc.run_id, doc.time_s, doc.model_dump_json())
                        self._insert_cell_state.run(conn, [row])
                self._write_sample_rows(conn, sample_rows)
                self._insert_impedance.run(conn, impedance_rows)
                if inserted:
                    self._insert_block.run(conn, [(run, *blocks.pack(group)) for run, group in inserted.items()])
        return counts

    def _write_sample_rows(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        """The sample rows of the batches this write stored. On PostgreSQL by COPY: its executemany of INSERT ...
        ON CONFLICT stored 4x fewer rows per second, behind a recorder that keeps up with SQLite.

        No row can be there already: a batch's rows go in with its batch row, in the same transaction, and only
        when that row was new. Should one be there all the same (a database written by hand), COPY fails on the
        unique index, its savepoint is rolled back and the rows go in as before, skipping what is there."""
        if not rows:
            return
        if self.engine.dialect.name != "postgresql" or len(rows) < _COPY_MIN_ROWS:
            self._insert_samples.run(conn, rows)
            return
        import psycopg

        try:
            with conn.begin_nested():
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                with cursor, cursor.copy(_COPY_SAMPLES) as copy:
                    for row in rows:
                        copy.write_row(row)
        except psycopg.errors.UniqueViolation:
            log.warning("sample rows already stored under new batches: written one by one, skipping those there")
            self._insert_samples.run(conn, rows)

    def _own_channel(self, conn: Connection, doc: SampleBatch | StepEvent | RunStart | RunStop | Outage) -> bool:
        """A run's documents come from the channel its first RunStart named: one channel's agent cannot
        write into another channel's run (its own topic is all a signature proves)."""
        channel = self._run_channels.get(doc.run_id)
        if channel is None:
            channel = conn.execute(select(runs.c.channel).where(runs.c.run_id == doc.run_id)).scalar()
            if channel is None:
                return True  # no run yet (a batch overtook its RunStart): nothing to hold it to
            self._run_channels[doc.run_id] = channel
        if channel != doc.channel:
            log.warning(
                "refused a %s for run %s from channel %s: the run is channel %s's",
                doc.kind,
                doc.run_id,
                doc.channel,
                channel,
            )
            return False
        return True

    def _write_batch(
        self,
        conn: Connection,
        batch: SampleBatch,
        counts: WriteCounts,
        sample_rows: list[tuple[Any, ...]],
        impedance_rows: list[tuple[Any, ...]],
    ) -> bool:
        """Store one batch's rows; True when it was new (not a re-delivery, not a conflict)."""
        n = len(batch.time_s)
        digest = batch_digest(batch)
        if self._insert_batch.run(conn, [(batch.run_id, batch.seq, n, digest)]) != 1:
            stored = self._stored_digest(conn, batch.run_id, batch.seq)
            if stored == digest:
                counts.duplicate_batches += 1  # a QoS 1 re-delivery
                return False
            received_at = datetime.now(UTC).isoformat()
            conflict = {
                "run_id": batch.run_id,
                "seq": batch.seq,
                "incoming_digest": digest,
                "stored_digest": stored,
                "n": n,
                "received_at": received_at,
                "doc": batch.model_dump_json(),
            }
            if self._insert_conflict.run(conn, [tuple(conflict[c] for c in _CONFLICT_COLUMNS)]) == 1:
                counts.conflicts += 1
                counts.conflicting.append((batch.run_id, batch.seq))
            else:
                counts.duplicate_batches += 1  # a re-delivery of a conflict already recorded
            return False
        keys = ([batch.run_id] * n, [batch.seq] * n, range(n))
        sample_rows.extend(zip(*keys, *(getattr(batch, field) for field, _, _ in SAMPLE_FIELDS)))
        if batch.frequency_Hz is not None:
            missing = [None] * n
            z = (batch.frequency_Hz, batch.z_real_ohm or missing, batch.z_imag_ohm or missing)
            impedance_rows.extend(zip(*keys, *z))
        counts.batches += 1
        counts.samples += n
        return True

    def _stored_digest(self, conn: Connection, run_id: str, seq: int) -> str:
        """The stored batch's digest; for one stored before schema 3 (NULL), computed from its stored rows."""
        rows = self._select_digest.fetch(conn, (run_id, seq))
        if rows and rows[0][0] is not None:
            return str(rows[0][0])
        stored = self._select_batch_samples.fetch(conn, (run_id, seq))
        names = (*FLOAT_COLUMNS, *INT_COLUMNS)
        columns: dict[str, Sequence[Any]] = {name: [row[k] for row in stored] for k, name in enumerate(names)}
        points = self._select_batch_impedance.fetch(conn, (run_id, seq))
        z = ([p[0] for p in points], [p[1] for p in points], [p[2] for p in points]) if points else None
        return samples_digest(columns, z, len(stored))

    # ------------------------------------------------------------------ reading

    def _fetch(self, statement: Any) -> Sequence[Any]:
        with self._connect() as conn:
            return [tuple(row) for row in conn.execute(statement)]

    def runs(self) -> list[RunRow]:
        stored = select(func.coalesce(func.sum(batches.c.n), 0)).where(batches.c.run_id == runs.c.run_id)
        conflicts = select(func.count()).select_from(batch_conflicts).where(batch_conflicts.c.run_id == runs.c.run_id)
        n_outages = select(func.count()).select_from(outages).where(outages.c.run_id == runs.c.run_id)
        outage_s = select(func.coalesce(func.sum(outages.c.span_s), 0.0)).where(outages.c.run_id == runs.c.run_id)
        c = runs.c
        rows = self._fetch(
            select(
                c.run_id,
                c.lab,
                c.channel,
                c.cell_id,
                c.protocol,
                c.started_at,
                c.stopped_at,
                c.exit_status,
                c.reason,
                c.reported_samples,
                stored.scalar_subquery(),
                c.cell_time_s,
                conflicts.scalar_subquery(),
                n_outages.scalar_subquery(),
                outage_s.scalar_subquery(),
            ).order_by(c.started_at.asc().nulls_first(), c.run_id)
        )
        out = []
        for row in rows:
            values = list(row)
            values[10], values[12], values[13] = int(values[10]), int(values[12]), int(values[13])
            values[14] = float(values[14])
            out.append(RunRow(*values))
        # Samples under a run id that no run document named: an agent whose RunStart never arrived, or someone
        # publishing batches of an invented run. Listed, so a store never holds samples nobody can see.
        unannounced = self._fetch(
            select(batches.c.run_id, func.sum(batches.c.n))
            .where(batches.c.run_id.not_in(select(runs.c.run_id)))
            .group_by(batches.c.run_id)
            .order_by(batches.c.run_id)
        )
        for run_id, n in unannounced:
            out.append(
                RunRow(run_id, None, None, None, None, None, None, None, None, None, int(n), None, announced=False)
            )
        return out

    def conflicts(self, run_id: str | None = None) -> list[BatchConflict]:
        """Batches that came with a stored (run_id, seq) but other samples, in the order they arrived."""
        c = batch_conflicts.c
        query = select(c.run_id, c.seq, c.stored_digest, c.incoming_digest, c.n, c.received_at, c.doc)
        if run_id is not None:
            query = query.where(c.run_id == run_id)
        query = query.order_by(c.received_at, c.run_id, c.seq, c.incoming_digest)
        return [
            BatchConflict(rid, int(seq), stored, incoming, int(n), received, SampleBatch.model_validate_json(doc))
            for rid, seq, stored, incoming, n, received, doc in self._fetch(query)
        ]

    def find_run(self, prefix: str) -> str:
        """A run id from its full text or a unique prefix (as git does for commits)."""
        # LIKE is case-insensitive on SQLite and not on PostgreSQL: the final test is Python's, the same on both.
        found = [
            r[0]
            for r in self._fetch(select(runs.c.run_id).where(runs.c.run_id.startswith(prefix, autoescape=True)))
            if r[0].startswith(prefix)
        ]
        if not found:
            raise KeyError(f"no run {prefix!r} in {describe_url(self.url)}: `labtwin runs` lists them")
        if len(found) > 1 and prefix not in found:
            raise KeyError(f"run prefix {prefix!r} is ambiguous: {', '.join(sorted(found)[:5])}")
        return prefix if prefix in found else found[0]

    def samples(self, run_id: str) -> dict[str, np.ndarray]:
        """All samples of a run in order, as numpy columns named with their units.

        From the run's sample blocks when they add up to its batches (labtwin.data.blocks: milliseconds for a
        million samples), else from its rows (``sample_rows``, the reference the blocks are tested against).
        """
        b = batches.c
        with self._connect() as conn:
            stored = conn.execute(select(func.coalesce(func.sum(b.n), 0)).where(b.run_id == run_id)).scalar()
            found = conn.execute(
                select(sample_blocks.c.n, sample_blocks.c.data).where(sample_blocks.c.run_id == run_id)
            ).all()
        if found and sum(int(n) for n, _ in found) == int(stored or 0):
            return blocks.unpack([(int(n), bytes(data)) for n, data in found])
        return self.sample_rows(run_id)

    def sample_rows(self, run_id: str) -> dict[str, np.ndarray]:
        """All samples of a run in order, read from its rows."""
        with self._connect() as conn:
            rows = self._select_samples.fetch(conn, (run_id,))
        data = np.array(rows, dtype=float).reshape(-1, len(SAMPLE_FIELDS))
        out = {name: data[:, k] for k, (name, _, _) in enumerate(SAMPLE_FIELDS)}
        out["step"] = out["step"].astype(int)
        out["cycle"] = out["cycle"].astype(int)
        return out

    def impedance(self, run_id: str) -> dict[str, np.ndarray]:
        """The impedance points of a run with the step and cycle they belong to, in measurement order."""
        with self._connect() as conn:
            rows = self._select_impedance.fetch(conn, (run_id,))
        data = np.array(rows, dtype=float).reshape(-1, 6)
        names = ("frequency_Hz", "z_real_ohm", "z_imag_ohm", "step", "cycle", "time_s")
        out = {name: data[:, k] for k, name in enumerate(names)}
        out["step"] = out["step"].astype(int)
        out["cycle"] = out["cycle"].astype(int)
        return out

    def anomalies(self, run_id: str | None = None, cell: str | None = None) -> list[Anomaly]:
        """The twin's anomalies, oldest first, for a run and/or a cell (all when neither is given)."""
        query = select(anomalies.c.doc).order_by(anomalies.c.time_s)
        if run_id is not None:
            query = query.where(anomalies.c.run_id == run_id)
        if cell is not None:
            query = query.where(anomalies.c.cell == cell)
        return [Anomaly.model_validate_json(row[0]) for row in self._fetch(query)]

    def cell_states(self, cell: str, run_id: str | None = None) -> list[CellState]:
        query = select(cell_states.c.doc).where(cell_states.c.cell == cell)
        if run_id:
            query = query.where(cell_states.c.run_id == run_id)
        query = query.order_by(cell_states.c.run_id, cell_states.c.time_s)
        return [CellState.model_validate_json(row[0]) for row in self._fetch(query)]

    def sample_count(self, run_id: str) -> int:
        return int(self._fetch(select(func.count()).select_from(samples).where(samples.c.run_id == run_id))[0][0])

    def batch_version(self, run_id: str) -> tuple[int, int]:
        """(batches stored, their sample count) of a run, from the batch index: what changes when samples arrive,
        without counting a million sample rows (70 ms) on every page request."""
        b = batches.c
        count, n = self._fetch(
            select(func.count(), func.coalesce(func.sum(b.n), 0)).select_from(batches).where(b.run_id == run_id)
        )[0]
        return int(count), int(n)

    def seqs(self, run_id: str) -> list[int]:
        rows = self._fetch(select(batches.c.seq).where(batches.c.run_id == run_id).order_by(batches.c.seq))
        return [int(r[0]) for r in rows]

    def step_events(self, run_id: str, event: str | None = "ended") -> list[StepEvent]:
        query = select(step_events.c.doc).where(step_events.c.run_id == run_id)
        if event is None:
            query = query.order_by(step_events.c.step_index, step_events.c.event.desc())
        else:
            query = query.where(step_events.c.event == event).order_by(step_events.c.step_index)
        return [StepEvent.model_validate_json(r[0]) for r in self._fetch(query)]

    def outages(self, run_id: str) -> list[Outage]:
        """A run's outages (stretches no agent read the instrument), in the order they began."""
        query = select(outages.c.doc).where(outages.c.run_id == run_id).order_by(outages.c.from_time_s)
        return [Outage.model_validate_json(r[0]) for r in self._fetch(query)]

    def record_action(
        self,
        *,
        lab: str,
        channel: str,
        action: str,
        user_name: str,
        role: str,
        outcome: str,
        run_id: str | None = None,
        time_s: float | None = None,
        detail: str = "",
    ) -> None:
        """One operator action, as the dashboard sent it and as the agent answered (schema 5)."""
        row = {
            "run_id": run_id,
            "lab": lab,
            "channel": channel,
            "action": action,
            "user_name": user_name,
            "role": role,
            "wall_time": datetime.now(UTC).isoformat(),
            "time_s": time_s,
            "outcome": outcome,
            "detail": detail,
        }
        with self._connect() as conn, conn.begin():
            conn.execute(operator_actions.insert().values(**row))

    def operator_actions(self, run_id: str | None = None, channel: str | None = None) -> list[dict[str, Any]]:
        """Operator actions, oldest first, for a run and/or a channel."""
        query = select(operator_actions).order_by(operator_actions.c.id)
        if run_id is not None:
            query = query.where(operator_actions.c.run_id == run_id)
        if channel is not None:
            query = query.where(operator_actions.c.channel == channel)
        names = [c.name for c in operator_actions.columns]
        return [dict(zip(names, row)) for row in self._fetch(query)]

    def run_documents(self, run_id: str) -> tuple[RunStart | None, RunStop | None]:
        rows = self._fetch(select(runs.c.start_doc, runs.c.stop_doc).where(runs.c.run_id == run_id))
        if not rows:
            return None, None
        start_doc, stop_doc = rows[0]
        start = RunStart.model_validate_json(start_doc) if start_doc else None
        stop = RunStop.model_validate_json(stop_doc) if stop_doc else None
        return start, stop


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled once for this database and run with plain rows.

    SQLAlchemy does not cache INSERT ... ON CONFLICT, and its per-row parameter
    handling costs more than SQLite's insert: the recorder's bulk writes go to
    the driver's executemany directly, with the SQL SQLAlchemy wrote for the
    dialect. Rows are tuples in the order of ``columns``.
    """

    sql: str
    columns: tuple[str, ...]
    order: tuple[int, ...] | None  # positional paramstyle: where each placeholder's value is in a row

    @classmethod
    def of(cls, statement: Any, columns: Sequence[str], engine: Engine) -> _Compiled:
        """``statement`` an INSERT (its VALUES are ``columns``) or a SELECT whose bound parameters are ``columns``."""
        if not isinstance(statement, Select):
            statement = statement.values({c: bindparam(c) for c in columns})
        compiled = statement.compile(dialect=engine.dialect)
        if compiled.positional:
            assert compiled.positiontup is not None
            order: tuple[int, ...] | None = tuple(list(columns).index(key) for key in compiled.positiontup)
        else:
            order = None
        return cls(compiled.string, tuple(columns), order)

    def run(self, conn: Connection, rows: Sequence[tuple[Any, ...]]) -> int:
        """Rows inserted (or updated); 0 for rows that were there already."""
        if not rows:
            return 0
        params: list[Any]
        if self.order is None:
            params = [dict(zip(self.columns, row)) for row in rows]
        elif self.order == tuple(range(len(self.columns))):
            params = list(rows)
        else:
            params = [tuple(row[k] for k in self.order) for row in rows]
        if len(params) == 1:
            return conn.exec_driver_sql(self.sql, params[0]).rowcount
        return conn.exec_driver_sql(self.sql, params).rowcount

    def fetch(self, conn: Connection, row: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """A SELECT's rows as the driver's tuples: for the sample columns, where Row objects cost more than the query."""
        params: Any = dict(zip(self.columns, row)) if self.order is None else tuple(row[k] for k in self.order)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, params)
            return cursor.fetchall()
        finally:
            cursor.close()


def _step_event_row(ev: StepEvent) -> tuple[Any, ...]:
    row = {
        "run_id": ev.run_id,
        "step_index": ev.step_index,
        "event": ev.event,
        "channel": ev.channel,
        "label": ev.label,
        "cycle": ev.cycle,
        "step": ev.step.value,
        "time_s": ev.time_s,
        "reason_kind": ev.reason.kind if ev.reason else None,
        "reason_name": ev.reason.name if ev.reason else None,
        "doc": ev.model_dump_json(),
    }
    return tuple(row[c] for c in _STEP_EVENT_COLUMNS)


def _outage_row(doc: Outage) -> tuple[Any, ...]:
    row = {
        "run_id": doc.run_id,
        "from_time_s": doc.from_time_s,
        "channel": doc.channel,
        "cause": doc.cause,
        "step_index": doc.step_index,
        "to_time_s": doc.to_time_s,
        "span_s": doc.span_s,
        "wall_span_s": doc.wall_span_s,
        "charge_ah": doc.charge_Ah,
        "doc": doc.model_dump_json(),
    }
    return tuple(row[c] for c in _OUTAGE_COLUMNS)


def _run_start_row(doc: RunStart) -> tuple[Any, ...]:
    return (
        doc.run_id,
        doc.lab,
        doc.channel,
        doc.cell_id,
        doc.protocol,
        doc.n_steps,
        doc.time.isoformat(),
        doc.flow_run_id,
        doc.model_dump_json(),
    )


def _run_stop_row(doc: RunStop) -> tuple[Any, ...]:
    return (
        doc.run_id,
        doc.channel,
        doc.time.isoformat(),
        doc.exit_status,
        doc.reason,
        doc.n_samples,
        doc.last_seq,
        doc.cell_time_s,
        doc.model_dump_json(),
    )


def _anomaly_row(doc: Anomaly) -> tuple[Any, ...]:
    row = {
        "run_id": doc.run_id,
        "cell": doc.cell,
        "kind": doc.kind,
        "time_s": doc.time_s,
        "detected_time_s": doc.detected_time_s,
        "step": doc.step,
        "cycle": doc.cycle,
        "action": doc.action,
        "message": doc.message,
        "doc": doc.model_dump_json(),
    }
    return tuple(row[c] for c in _ANOMALY_COLUMNS)
