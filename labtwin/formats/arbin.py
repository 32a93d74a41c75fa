"""Arbin cycler files: the CSV and XLSX exports of MITS Pro / DataPro, and the ``.res`` database itself.

An Arbin table has ``Test_Time``, ``Voltage``, ``Current``, ``Step_Index``, ``Cycle_Index`` and two capacity
counters, ``Charge_Capacity`` and ``Discharge_Capacity``, that restart at every new cycle index. Newer exports
put the unit in the name (``Test_Time(s)``, ``Current(mA)``); the older CSV and the ``.res`` tables name none
and are in Arbin's own units (s, V, A, Ah, degC), said so in the recording's notes. A unit labtwin does not
know is refused, naming the column. Current is positive when charging, labtwin's sign.

The file's ``Cycle_Index`` is the schedule's counter (a schedule that never increments it files two full
cycles as one), so cycles are left to labtwin's one definition (labtwin.analysis.cycles), counted from the
direction each step moved charge; the cycle index still separates steps, as the step index repeats in it.

``.res`` is an MS Access database: galvani's ``res2sqlite`` (the ``biologic`` extra) copies it to SQLite with
``mdb-export`` from mdbtools (``apt-get install mdbtools``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np

from labtwin.formats.cycler_columns import counter_increments, numbers, steps_from_labels, unit_factor, xlsx_sheets
from labtwin.formats.recording import Recording, RecordingError, finish

_LABEL = re.compile(r"^(?P<name>.*?)\s*\((?P<unit>[^()]*)\)\s*(?P<index>_\d+)?$")

# base name -> (dimension, Arbin's unit when the name gives none)
_QUANTITIES = {
    "test_time": ("time", "s"),
    "voltage": ("voltage", "V"),
    "current": ("current", "A"),
    "charge_capacity": ("charge", "Ah"),
    "discharge_capacity": ("charge", "Ah"),
}
_REQUIRED = ("test_time", "voltage", "current")


def _split(label: str) -> tuple[str, str | None]:
    """``'Charge_Capacity(mAh)'`` -> ``('charge_capacity', 'mAh')``; ``'Test Time'`` -> ``('test_time', None)``."""
    m = _LABEL.match(label.strip())
    name, unit = (m["name"] + (m["index"] or ""), m["unit"]) if m else (label.strip(), None)
    return re.sub(r"[\s_]+", "_", name.strip().lower()), unit


def is_arbin_header(header: list[str]) -> bool:
    bases = {_split(h)[0] for h in header}
    return set(_REQUIRED) <= bases and bool({"step_index", "cycle_index"} & bases)


def _recording(path: Path, header: list[str], values: list[list], fmt: str) -> Recording:
    """A Recording from an Arbin table: ``header`` and its columns of cell values."""
    where: dict[str, tuple[int, str | None]] = {}
    for k, label in enumerate(header):
        base, unit = _split(label)
        where.setdefault(base, (k, unit))
    missing = [q for q in _REQUIRED if q not in where]
    if missing:
        raise RecordingError(
            f"{path}: no Arbin column {missing}: an Arbin table has Test_Time, Voltage, Current; the header is {header}"
        )
    unitless: list[str] = []

    def column(base: str, dimension: str | None = None, default: str | None = None) -> np.ndarray | None:
        if base not in where:
            return None
        k, unit = where[base]
        data = numbers(path, header[k], values[k])
        if dimension is None:
            return data
        if unit is None:
            unitless.append(header[k])
            unit = default or ""
        return data * unit_factor(path, header[k], unit, dimension)

    t, v, i = (column(q, *_QUANTITIES[q]) for q in _REQUIRED)
    assert t is not None and v is not None and i is not None
    for name, data in (("Test_Time", t), ("Voltage", v), ("Current", i)):
        if not len(data) or np.any(~np.isfinite(data)):
            raise RecordingError(f"{path}: column {name!r} has an empty cell or no rows; Arbin writes one on every row")
    cycle = column("cycle_index")
    step_index = column("step_index")
    labels = [np.nan_to_num(c) for c in (step_index, cycle) if c is not None]
    step = steps_from_labels(*labels)
    charge = column("charge_capacity", *_QUANTITIES["charge_capacity"])
    discharge = column("discharge_capacity", *_QUANTITIES["discharge_capacity"])
    q = None
    if charge is not None and discharge is not None:
        # Both counters restart with each new cycle index (and wherever they fall).
        new_cycle = (
            np.concatenate([[False], np.diff(np.nan_to_num(cycle)) != 0])
            if cycle is not None
            else np.zeros(len(t), bool)
        )
        q = np.cumsum(counter_increments(charge, new_cycle) - counter_increments(discharge, new_cycle))
    temperature = None
    for k, label in enumerate(header):
        base, unit = _split(label)
        if "temperature" in base:
            temperature = numbers(path, label, values[k]) * unit_factor(path, label, unit or "C", "temperature")
            if unit is None:
                unitless.append(label)
            break
    rec = finish(path.stem, fmt, t, v, i, step, None, q, temperature, unix_start_s=_unix_start(header, values, t))
    if unitless:
        rec.notes.append(f"columns {unitless} name no unit: read in Arbin's units (s, V, A, Ah, degC)")
    if charge is None or discharge is None:
        rec.notes.append("no Charge_Capacity/Discharge_Capacity columns: charge counted from the current")
    return rec


def _unix_start(header: list[str], values: list[list], t: np.ndarray) -> float | None:
    """The wall time of the first row, where the file gives it as Unix time (the CSV's ``DateTime``); a
    spreadsheet date or an Access date has no time zone, so it is not guessed."""
    for k, label in enumerate(header):
        if _split(label)[0] in ("datetime", "date_time"):
            first = values[k][0] if values[k] else None
            try:
                value = float(first)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return None
            return value - float(t[0]) if value > 1e8 else None
    return None


def read_arbin_csv(path: Path) -> Recording:
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
            rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    except (OSError, csv.Error) as exc:
        raise RecordingError(f"{path}: not a readable Arbin CSV export ({exc})") from None
    if len(rows) < 2:
        raise RecordingError(f"{path}: an Arbin CSV export with no data rows")
    header, body = rows[0], rows[1:]
    width = len(header)
    short = next((n for n, r in enumerate(body, start=2) if len(r) < width), None)
    if short is not None:
        raise RecordingError(f"{path}: row {short} has fewer cells than the header's {width}")
    values = [[r[k] for r in body] for k in range(width)]
    return _recording(path, header, values, "arbin-csv")


def read_arbin_xlsx(path: Path) -> Recording:
    """The data sheets (``Channel_<n>_<k>``, Arbin splits long tests over several) in order, one table."""
    header: list[str] | None = None
    body: list[tuple] = []
    for name, rows in xlsx_sheets(path):
        first = next(rows, None)
        labels = [str(c).strip() if c is not None else "" for c in first] if first else []
        if not name.lower().startswith("channel") or not is_arbin_header(labels):
            continue
        if header is None:
            header = labels
        elif labels != header:
            raise RecordingError(f"{path}: sheet {name!r} has other columns than the first data sheet's")
        body.extend(r for r in rows if any(c is not None for c in r))
    if header is None:
        raise RecordingError(f"{path}: no Arbin data sheet (Channel_..., with Test_Time, Voltage, Current)")
    if not body:
        raise RecordingError(f"{path}: an Arbin workbook with no data rows")
    values = [[r[k] if k < len(r) else None for r in body] for k in range(len(header))]
    return _recording(path, header, values, "arbin-xlsx")


def read_arbin_res(path: Path) -> Recording:
    try:
        from galvani import res2sqlite
    except ImportError:
        raise RecordingError(f"{path}: reading Arbin .res needs galvani: pip install 'labtwin[biologic]'") from None
    if shutil.which("mdb-export") is None:
        raise RecordingError(f"{path}: reading Arbin .res needs mdb-export from mdbtools (apt-get install mdbtools)")
    with tempfile.TemporaryDirectory(prefix="labtwin-res-") as tmp:
        db = Path(tmp) / "res.sqlite"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints each table it copies
                res2sqlite.convert_arbin_to_sqlite(str(path), str(db))
            con = sqlite3.connect(db)
            try:
                cur = con.execute("SELECT * FROM Channel_Normal_Table ORDER BY Test_ID, Data_Point")
                header = [d[0] for d in cur.description]
                body = cur.fetchall()
            finally:
                con.close()
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no data table"
            raise RecordingError(
                f"{path}: not an Arbin .res database that mdb-export and galvani can read ({type(exc).__name__}: {detail})"
            ) from None
    if not body:
        raise RecordingError(f"{path}: an Arbin .res database with no data rows")
    # Channel_Normal_Table's DateTime is an Access date (local days since 1899-12-30, no time zone): not kept.
    values = [[r[k] for r in body] for k in range(len(header))]
    return _recording(path, header, values, "arbin-res")
