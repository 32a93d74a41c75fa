"""The agent's durable spool: every batch and event it publishes, on local disk before the bus sees it.

Why: a broker restart, a recorder that was away, or a full broker queue used to lose what the agent
produced (issue 14). Written here first, a document survives all of them and the agent itself: the
recorder asks for what it misses (a ResendRequest) and the agent answers from this file; whatever was
never handed to the bus is published when the agent starts again.

One SQLite file per channel (WAL: the step thread appends while the event loop reads), under
./labtwin-data/spool/<lab>-<channel>.db by default. Entries are kept until the recorder says the run is
complete (its RunStop and every batch up to its last_seq are stored), or for ``keep_days``. The file is
bounded by disk: past ``warn_bytes`` it says so once per crossing, and it never drops an entry itself.

A spool is one agent's: it is held with an exclusive ``flock`` on a sidecar ``<file>.lock`` (holding the
holder's pid) from open to close. A second agent of the same lab and channel in the same directory would
otherwise pump the first's entries; it is refused (``SpoolBusy``: the file and the holder's pid) before it
touches the instrument. The kernel drops the lock when its holder dies, ``kill -9`` included, so a stale lock
file never blocks a restart (docs/decisions/0011).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
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
CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
DROP INDEX IF EXISTS entries_unhanded;
"""
# Entries are handed to the bus in id order, so "handed" is one number, the highest id handed over
# (``marks.handed_through``), not a flag per row: updating a flag rewrote each row with its payload and index
# entry, and in bench/soak.py that, with the read beside it, was 60 % of the event loop of 16 agents (every
# client missed its keepalive). The ``handed`` column stays for spools written before; it is read once, at open.


class SpoolBusy(OSError):
    """Another live process holds this spool (an agent of the same lab and channel in the same directory)."""


class SpoolLock:
    """An exclusive, non-blocking lock on ``<spool>.lock``, held for the spool's life; the file names the holder.

    POSIX: ``fcntl.flock`` (per open file, so a second Spool of the same file in one process is refused too). The
    lock is taken on the file the path names at that moment: after locking, the path is checked to still be that
    file (a closing holder unlinks it), else the lock is taken again. Windows: ``msvcrt.locking`` on the file's
    first byte (not exercised by the test suite, which runs on Linux)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise SpoolBusy(
                    f"spool {path.with_suffix('')} is held by another agent (pid {holder}): one agent per lab and "
                    "channel in a working directory; stop that one, or start this one in another directory"
                )
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file between our open and our lock: lock the new one
        raise SpoolBusy(f"spool {path.with_suffix('')}: its lock file keeps changing; is another agent restarting?")

    def release(self, remove: bool = False) -> None:
        """Unlocks; ``remove`` unlinks the lock file first (while still held, so no one holds a lock on a file
        that is gone without seeing it gone)."""
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # closing the descriptor releases the lock
        self._fd = None

    def __del__(self) -> None:  # a Spool dropped without close (a test's last look) does not hold its lock on
        self.release()


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - not run here
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip() if hasattr(os, "pread") else ""
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@dataclass(frozen=True)
class SpoolEntry:
    ident: int
    topic: str
    payload: bytes
    run_id: str | None
    seq: int | None  # a batch's seq; None for an event
    created_s: float = 0.0  # wall time (epoch seconds) it was journalled


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
            self._held = SpoolLock(Path(str(path) + ".lock"))
        except SpoolBusy:
            raise
        except OSError as exc:
            raise OSError(f"spool {path}: cannot open ({exc}): give the agent a writable spool directory") from None
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            self._held.release()
            raise OSError(f"spool {path}: cannot open ({exc}): give the agent a writable spool directory") from None
        self._handed_through = self._read_handed_through()
        self.prune()

    def _read_handed_through(self) -> int:
        row = self._db.execute("SELECT value FROM marks WHERE name = 'handed_through'").fetchone()
        if row is not None:
            return int(row[0])
        # A spool from before the mark (or a new one): everything before its first unhanded row went out.
        first = self._db.execute("SELECT MIN(id) FROM entries WHERE handed = 0").fetchone()[0]
        last = self._db.execute("SELECT MAX(id) FROM entries").fetchone()[0]
        through = int(first) - 1 if first is not None else int(last or 0)
        self._db.execute("INSERT OR REPLACE INTO marks (name, value) VALUES ('handed_through', ?)", (through,))
        return through

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
        self._held.release(remove=empty)

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
        """These entries, the oldest unhanded ones, are in the bus's outbox: not to be published again at a
        restart (a resend covers loss)."""
        through = max(idents, default=None)
        if through is None or through <= self._handed_through:
            return
        with self._lock:
            self._db.execute("UPDATE marks SET value = ? WHERE name = 'handed_through'", (through,))
            self._handed_through = through

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
                "SELECT id, topic, payload, run_id, seq FROM entries WHERE id > ? ORDER BY id LIMIT ?",
                (self._handed_through, limit),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def batches(self, run_id: str, first_seq: int, last_seq: int, limit: int = -1) -> list[SpoolEntry]:
        """A run's batches with first_seq <= seq <= last_seq (each once, the first written), at most ``limit``."""
        with self._lock:
            rows = self._db.execute(
                "SELECT MIN(id), topic, payload, run_id, seq FROM entries WHERE run_id = ? AND seq BETWEEN ? AND ? "
                "GROUP BY seq ORDER BY seq LIMIT ?",
                (run_id, first_seq, last_seq, limit),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def events(self, run_id: str) -> list[SpoolEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, run_id, seq FROM entries WHERE run_id = ? AND seq IS NULL ORDER BY id",
                (run_id,),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

    def run_ids(self) -> list[str]:
        """The runs the spool holds entries of, oldest first (by their first entry)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id FROM entries WHERE run_id IS NOT NULL GROUP BY run_id ORDER BY MIN(id)"
            ).fetchall()
        return [r[0] for r in rows]

    def entries(self, run_id: str) -> list[SpoolEntry]:
        """Every entry of a run, batches and events, in the order they were written."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, run_id, seq, created_s FROM entries WHERE run_id = ? ORDER BY id",
                (run_id,),
            ).fetchall()
        return [SpoolEntry(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows]

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
