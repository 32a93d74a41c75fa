"""The agent's durable spool: every batch and event it publishes, on local disk before the bus sees it.

Why: a broker restart, a recorder that was away, or a full broker queue used to lose what the agent
produced (issue 14). Written here first, a document survives all of them and the agent itself: the
recorder asks for what it misses (a ResendRequest) and the agent answers from this file; whatever was
never handed to the bus is published when the agent starts again.

One SQLite file per channel (WAL: the step thread appends while the event loop reads), under
./labtwin-data/spool/<lab>-<channel>.db by default. Entries are kept until the recorder says the run is
complete (its RunStop and every batch up to its last_seq are stored), or for ``keep_days``. The file is
bounded by disk: past ``warn_bytes`` it says so once per crossing, and it never drops an entry itself.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_SPOOL_DIR = Path("labtwin-data") / "spool"
DEFAULT_KEEP_DAYS = 30.0
DEFAULT_WARN_BYTES = 2 * 1024**3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    run_id TEXT,
    seq INTEGER,
    created_s REAL NOT NULL,
    handed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_run_seq ON entries (run_id, seq);
CREATE INDEX IF NOT EXISTS entries_unhanded ON entries (handed, id);
"""


@dataclass(frozen=True)
class SpoolEntry:
    ident: int
    topic: str
    payload: bytes
    run_id: str | None
    seq: int | None  # a batch's seq; None for an event


class Spool:
    """An append-only journal of outgoing documents (encoded, unsigned: the bus signs each send afresh)."""

    def __init__(
        self,
        path: Path,
        *,
        keep_days: float = DEFAULT_KEEP_DAYS,
        warn_bytes: int = DEFAULT_WARN_BYTES,
    ) -> None:
        self.path = path
        self.keep_days = keep_days
        self.warn_bytes = warn_bytes
        self._lock = threading.Lock()
        self._warned = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise OSError(f"spool {path}: cannot open ({exc}): give the agent a writable spool directory") from None
        self.prune()

    @classmethod
    def for_channel(cls, lab: str, channel: str, directory: Path | None = None, **kwargs: float) -> Spool:
        return cls((directory or DEFAULT_SPOOL_DIR) / f"{lab}-{channel}.db", **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Closes the file; an empty spool (every run confirmed) is removed, so the directory holds only what waits."""
        with self._lock:
            empty = self._db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is None
            self._db.close()
        if empty:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)

    # ------------------------------------------------------------------ writing

    def append(self, topic: str, payload: bytes, run_id: str | None = None, seq: int | None = None) -> int:
        """Journal one document; returns its id. Called from the step thread and the event loop alike."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO entries (topic, payload, run_id, seq, created_s) VALUES (?, ?, ?, ?, ?)",
                (topic, payload, run_id, seq, time.time()),
            )
            ident = int(cur.lastrowid or 0)
        if ident % 256 == 0:
            self._check_size()
        return ident

    def mark_handed(self, idents: Iterable[int]) -> None:
        """These entries are in the bus's outbox: not to be published again at a restart (a resend covers loss)."""
        ids = [(i,) for i in idents]
        if not ids:
            return
        with self._lock:
            self._db.executemany("UPDATE entries SET handed = 1 WHERE id = ?", ids)

    def forget_run(self, run_id: str) -> int:
        """The recorder holds all of the run: its entries may go. Returns how many went."""
        with self._lock:
            return self._db.execute("DELETE FROM entries WHERE run_id = ?", (run_id,)).rowcount

    def prune(self) -> int:
        """Entries older than keep_days go whatever their run's state."""
        cutoff = time.time() - self.keep_days * 86400
        with self._lock:
            return self._db.execute("DELETE FROM entries WHERE created_s < ?", (cutoff,)).rowcount

    # ------------------------------------------------------------------ reading

    def unhanded(self, limit: int = 500) -> list[SpoolEntry]:
        """The oldest entries not yet handed to the bus, in the order they were written."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, run_id, seq FROM entries WHERE handed = 0 ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def batches(self, run_id: str, first_seq: int, last_seq: int) -> list[SpoolEntry]:
        """A run's batches with first_seq <= seq <= last_seq (each once, the first written)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT MIN(id), topic, payload, run_id, seq FROM entries WHERE run_id = ? AND seq BETWEEN ? AND ? "
                "GROUP BY seq ORDER BY seq",
                (run_id, first_seq, last_seq),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def events(self, run_id: str) -> list[SpoolEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, run_id, seq FROM entries WHERE run_id = ? AND seq IS NULL ORDER BY id",
                (run_id,),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += Path(str(self.path) + suffix).stat().st_size
            except OSError:
                pass
        return total

    def _check_size(self) -> None:
        size = self.size_bytes()
        if size >= self.warn_bytes and not self._warned:
            self._warned = True
            log.warning(
                "spool %s holds %.1f MB, past its warning bound of %.1f MB: the recorder has not confirmed these "
                "runs (is it running?); free disk or raise the bound",
                self.path,
                size / 1e6,
                self.warn_bytes / 1e6,
            )
        elif size < 0.9 * self.warn_bytes:
            self._warned = False
