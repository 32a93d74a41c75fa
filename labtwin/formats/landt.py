"""LANDT (LANHE) cycler workbooks: the ``.xlsx`` the LANDdt software exports, read from its record sheet.

The record sheet's columns carry their unit after a slash (``TestTime/h``, ``StepTime/h``, ``Voltage/V``,
``Current/mA``, ``Capacity/mAh``); each is converted, and a unit labtwin does not know is refused, naming the
column. ``State`` names each row's work (``C_CC`` charge, ``D_CC`` discharge, ``R`` rest, and the CV, CP...
variants): the step is a new one wherever the state changes or the step clock starts again. ``Capacity`` is
the step's own, unsigned: it restarts every step and is signed by the state into labtwin's net charge
(labtwin.formats.cycler_columns). Current is signed by the state the same way (positive = charge).

The workbook numbers no cycles on its record rows (its ``Cycle`` sheet is the software's summary), so they are
labtwin's own, counted from the direction each step moved charge (labtwin.analysis.cycles). The export rounds
``TestTime/h`` to 0.01 h (36 s): rows of one 36 s interval share a time, and the charge is the file's
capacity column, not the current integrated over those times.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labtwin.formats.cycler_columns import counter_increments, numbers, unit_factor, xlsx_sheets
from labtwin.formats.recording import Recording, RecordingError, finish

# the record sheet's quantity -> its dimension
_COLUMNS = {"testtime": "time", "steptime": "time", "voltage": "voltage", "current": "current", "capacity": "charge"}
_REQUIRED = ("testtime", "voltage", "current", "state")


def _split(label: str) -> tuple[str, str | None]:
    """``'Current/mA'`` -> ``('current', 'mA')``; ``'State'`` -> ``('state', None)``."""
    name, _, unit = label.strip().partition("/")
    return name.strip().lower().replace(" ", "").replace("_", ""), (unit.strip() or None)


def is_landt_header(header: list[str]) -> bool:
    return set(_REQUIRED) <= {_split(h)[0] for h in header}


def read_landt_xlsx(path: Path) -> Recording:
    header: list[str] = []
    body: list[tuple] | None = None
    for _, rows in xlsx_sheets(path):
        first = next(rows, None)
        header = [str(c).strip() if c is not None else "" for c in first] if first else []
        if is_landt_header(header):
            body = [r for r in rows if any(c is not None for c in r)]
            break
    if body is None:
        raise RecordingError(f"{path}: no LANDT record sheet (with TestTime/h, Voltage/V, Current/mA, State)")
    if not body:
        raise RecordingError(f"{path}: a LANDT record sheet with no data rows")
    where: dict[str, tuple[int, str]] = {}
    for k, label in enumerate(header):
        where.setdefault(_split(label)[0], (k, label))
    cols: dict[str, np.ndarray] = {}
    for name, dimension in _COLUMNS.items():
        if name not in where:
            continue
        k, label = where[name]
        unit = _split(label)[1]
        if unit is None:
            raise RecordingError(f"{path}: column {label!r} names no unit (LANDT writes 'Current/mA')")
        cols[name] = numbers(path, label, [r[k] if k < len(r) else None for r in body]) * unit_factor(
            path, label, unit, dimension
        )
    for name in ("testtime", "voltage", "current"):
        if np.any(~np.isfinite(cols[name])):
            raise RecordingError(f"{path}: column {where[name][1]!r} has an empty cell; LANDT writes one on every row")
    k_state = where["state"][0]
    state = np.array(
        [str(r[k_state]).strip().upper() if k_state < len(r) and r[k_state] is not None else "" for r in body]
    )
    kind = np.array([s[:1] for s in state])
    sign = np.where(kind == "C", 1.0, np.where(kind == "D", -1.0, 0.0))
    known = np.isin(kind, ["C", "D", "R"])
    current = np.where(known, sign * np.abs(cols["current"]), cols["current"])
    changed = np.concatenate([[False], state[1:] != state[:-1]])
    if "steptime" in cols:
        changed |= np.concatenate([[False], np.diff(np.nan_to_num(cols["steptime"])) < 0])
    q = None
    if "capacity" in cols:
        capacity = np.nan_to_num(cols["capacity"])
        changed |= np.concatenate([[False], capacity[1:] < capacity[:-1] - 1e-12])  # the step's count began again
        q = np.cumsum(np.where(known, sign, np.sign(cols["current"])) * counter_increments(capacity, changed))
    step = np.cumsum(changed).astype(int)
    rec = finish(path.stem, "landt-xlsx", cols["testtime"], cols["voltage"], current, step, None, q)
    if q is None:
        rec.notes.append("no Capacity column: charge counted from the current")
    return rec
