"""What the Arbin, Maccor and LANDT readers share: units read off a column's name, a cycler's capacity counters
turned into labtwin's net charge, step numbers from a cycler's labels, and the rows of an Excel sheet.

Cyclers keep capacity as counters that restart (Arbin per cycle, Maccor and LANDT per step) and are unsigned
(Maccor, LANDT: the state says charge or discharge). labtwin's ``capacity_Ah`` is one signed running total
since the recording began, so each counter is turned into increments first: the difference to the row before,
or, where the counter restarted, its whole value (what it gathered since the restart).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from labtwin.formats.recording import RecordingError

# unit (lower case) -> (dimension, factor to labtwin's unit: s, V, A, Ah, degC)
UNITS: dict[str, tuple[str, float]] = {
    "s": ("time", 1.0),
    "sec": ("time", 1.0),
    "ms": ("time", 1e-3),
    "min": ("time", 60.0),
    "h": ("time", 3600.0),
    "hr": ("time", 3600.0),
    "v": ("voltage", 1.0),
    "mv": ("voltage", 1e-3),
    "a": ("current", 1.0),
    "ma": ("current", 1e-3),
    "ua": ("current", 1e-6),
    "µa": ("current", 1e-6),
    "ah": ("charge", 1.0),
    "mah": ("charge", 1e-3),
    "uah": ("charge", 1e-6),
    "µah": ("charge", 1e-6),
    "c": ("temperature", 1.0),
    "°c": ("temperature", 1.0),
    "degc": ("temperature", 1.0),
    "1": ("count", 1.0),  # BDF's unit of a count (Cycle Count / 1)
}


def unit_factor(path: Path, column: str, unit: str, dimension: str) -> float:
    """The factor from ``unit`` to labtwin's unit of ``dimension``; a unit labtwin does not know is refused,
    naming the column, rather than read as if it were the canonical one."""
    found = UNITS.get(unit.strip().lower())
    if found is None or found[0] != dimension:
        known = sorted(u for u, (d, _) in UNITS.items() if d == dimension)
        raise RecordingError(
            f"{path}: column {column!r}: unit {unit!r} is not a {dimension} unit labtwin reads {known}"
        )
    return found[1]


def counter_increments(counter: np.ndarray, restart: np.ndarray) -> np.ndarray:
    """What a cycler's capacity counter gathered at each row: its difference to the row before, or its whole
    value where it restarted (``restart``, or wherever it fell: a counter only grows between restarts).
    The first row adds nothing: labtwin counts charge from the recording's start, and a file that begins
    mid-test (an Arbin export of a later step) carries what the cell moved before it."""
    c = np.nan_to_num(np.asarray(counter, dtype=float))
    if not len(c):
        return np.zeros(0)
    previous = np.concatenate([c[:1], c[:-1]])
    restarted = np.asarray(restart, dtype=bool) | (c < previous - 1e-12)
    increments = np.where(restarted, c, c - previous)
    increments[0] = 0.0
    return increments


def steps_from_labels(*labels: np.ndarray) -> np.ndarray:
    """Step numbers 0, 1, 2... from a cycler's own labels: a new step wherever any of them changes (a
    protocol's step number repeats every cycle, so the cycle index is one of the labels)."""
    n = len(labels[0])
    changed = np.zeros(max(n - 1, 0), dtype=bool)
    for label in labels:
        a = np.asarray(label)
        changed |= a[1:] != a[:-1]
    return np.concatenate([[0], np.cumsum(changed)]).astype(int) if n else np.zeros(0, dtype=int)


def xlsx_sheets(path: Path) -> Iterator[tuple[str, Iterator[tuple]]]:
    """Each sheet's name and its rows (tuples of cell values), streamed: openpyxl's read-only mode keeps a
    2 MB workbook's 60 000 rows out of memory as cell objects."""
    try:
        import openpyxl
    except ImportError:
        raise RecordingError(f"{path}: reading .xlsx needs openpyxl: pip install 'labtwin[excel]'") from None
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable .xlsx workbook ({type(exc).__name__}: {exc})") from None
    try:
        for sheet in book.worksheets:
            yield sheet.title, sheet.iter_rows(values_only=True)
    finally:
        book.close()


def xlsx_headers(path: Path) -> dict[str, list[str]]:
    """Every sheet's first row, for telling one cycler's workbook from another's without reading it all."""
    headers = {}
    for name, rows in xlsx_sheets(path):
        first = next(rows, ())
        headers[name] = [str(c).strip() for c in first if c is not None]
    return headers


def numbers(path: Path, column: str, values: list) -> np.ndarray:
    """A column of cell values as floats (an empty cell is NaN); text where a number belongs is refused."""
    try:
        return np.array([np.nan if v is None or v == "" else float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        bad = next(v for v in values if not _is_number(v))
        raise RecordingError(f"{path}: column {column!r} holds {bad!r} where a number belongs") from None


def _is_number(v: object) -> bool:
    if v is None or v == "":
        return True
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True
