"""A run's samples from a SQLite store as numpy columns, through ADBC (Arrow) instead of one Python tuple per row.

Why: the sqlite3 module builds a tuple of seven Python floats per sample, 1.4 s for a million before numpy
sees a value; a run page, ``export`` and ``analyze`` of a long run spent most of their time there. The ADBC
SQLite driver (Apache Arrow's) fills Arrow columns in C and releases the GIL while it does, so the run is read
in a few ranges of batch numbers on as many threads: 0.55 s for a million samples on two cores, beside 1.9 s.

``Store.samples`` uses this for a SQLite file and keeps the row reader as the reference (and for ``:memory:``,
which another connection cannot open, and whenever the driver is missing or refuses): the two give the same
columns, and a test holds them to it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sqlalchemy import Integer

from labtwin.data.schema import SAMPLE_FIELDS

log = logging.getLogger(__name__)

# Below this a single read is as quick as splitting it; above, one range per core (at most four).
SPLIT_ABOVE_SAMPLES = 200_000
MAX_THREADS = 4
BUSY_TIMEOUT_MS = 30_000

# The driver infers a column's type from its first batch of rows: a first batch whose temperature is all NULL
# (no probe) was typed integer, and the first real reading after it failed the read. A NULL is read as +inf
# instead, a value no stored sample has (every document's readings are bounded, labtwin.documents.data), and
# made NaN again here, as the row reader makes it.
_MISSING = "9e999"
_COLUMNS = ", ".join(f"IFNULL({col}, {_MISSING})" if kind is not Integer else col for _, col, kind in SAMPLE_FIELDS)


def warm() -> None:
    """Load pyarrow and the driver (0.35 s) before the first read needs them; nothing when not installed."""
    if available():
        import pyarrow  # noqa: F401


def available() -> bool:
    try:
        import adbc_driver_sqlite.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


def _read_range(path: Path, run_id: str, lo_seq: int, hi_seq: int) -> dict[str, np.ndarray]:
    import adbc_driver_sqlite.dbapi as adbc
    import pyarrow as pa

    with adbc.connect(str(path)) as conn, conn.cursor() as cur:
        # The driver sets no busy timeout: a reader that opened while another did (or while the recorder
        # checkpointed) failed at once with "database is locked" where sqlite3 waits, as the store does.
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.fetchall()
        cur.execute(
            f"SELECT {_COLUMNS} FROM samples WHERE run_id = ? AND seq >= ? AND seq <= ? ORDER BY seq, i",
            (run_id, lo_seq, hi_seq),
        )
        table = cur.fetch_arrow_table()
    out = {}
    for k, (name, _, _) in enumerate(SAMPLE_FIELDS):
        values = table.column(k).cast(pa.float64()).to_numpy(zero_copy_only=False)
        values = np.where(np.isposinf(values), np.nan, values)  # a reading the instrument did not give
        out[name] = values
    return out


def read_samples(path: Path, run_id: str, seq_range: tuple[int, int] | None, n_samples: int) -> dict[str, np.ndarray]:
    """The run's sample columns (float64; step and cycle as int), in (seq, i) order."""
    if seq_range is None:
        parts = [(0, -1)]  # no batch: an empty read that still has the columns
    else:
        lo, hi = seq_range
        threads = min(MAX_THREADS, os.cpu_count() or 1, max(1, hi - lo + 1))
        if n_samples < SPLIT_ABOVE_SAMPLES:
            threads = 1
        edges = np.linspace(lo, hi + 1, threads + 1).round().astype(int)
        parts = [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if len(parts) == 1:
        pieces = [_read_range(path, run_id, *parts[0])]
    else:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="labtwin-read") as pool:
            pieces = list(pool.map(lambda p: _read_range(path, run_id, *p), parts))
    out = {name: np.concatenate([p[name] for p in pieces]) for name, _, _ in SAMPLE_FIELDS}
    out["step"] = out["step"].astype(int)
    out["cycle"] = out["cycle"].astype(int)
    return out
