"""Maccor text exports, in both layouts that are about: tab-separated, a few lines of test information, then a
header row that starts with the record number.

- the classic one (MacTest32 export): ``Rec#  Cyc#  Step  Test (Min)  Step (Min)  Amp-hr  Watt-hr  Amps  Volts
  State  ES  DPt Time``, times in the unit the name gives (``Test (Min)``, ``Test (Sec)``);
- the newer one (MIMS Client / Backup export): ``Rec  Cycle  Step  Test Time  Step Time  Capacity  Energy
  Current  Voltage  MD  ES  DPT Time  Aux #1  Units ...``, times as ``0d 00:01:30.88``.

Maccor writes current and capacity unsigned: the state (``State``, ``MD``: C charge, D discharge, R rest) gives
the direction, and labtwin signs both from it (positive = charge). The capacity counter restarts with each
change of state, so it is read as increments of the running net charge (labtwin.formats.cycler_columns). A
unit named in the header (``mAmps``, ``mAmp-hr``, ``Capacity (mAh)``) is converted; a unit labtwin does not
know is refused, naming the column. The newer layout's names carry no unit: they are Maccor's A, Ah and V.

``Cyc#`` is the procedure's counter (an "advance cycle" step), 0 until the procedure first advances it, so
cycles are labtwin's own, counted from the direction each step moved charge (labtwin.analysis.cycles).
``DPt Time`` is a local clock time without a time zone: not used.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from labtwin.formats.cycler_columns import counter_increments, numbers, steps_from_labels, unit_factor
from labtwin.formats.recording import Recording, RecordingError, finish

HEADER_SEARCH_LINES = 30  # the test information above the header is 1 to 5 lines in the exports seen

# name without a unit in parentheses -> (quantity, dimension, unit)
_NAMED = {
    "amp-hr": ("capacity", "charge", "Ah"),
    "mamp-hr": ("capacity", "charge", "mAh"),
    "capacity": ("capacity", "charge", "Ah"),
    "amps": ("current", "current", "A"),
    "mamps": ("current", "current", "mA"),
    "current": ("current", "current", "A"),
    "volts": ("voltage", "voltage", "V"),
    "mvolts": ("voltage", "voltage", "mV"),
    "voltage": ("voltage", "voltage", "V"),
}
_WITH_UNIT = re.compile(r"^(?P<name>[^()]+?)\s*\((?P<unit>[^()]+)\)$")
_DURATION = re.compile(r"^\s*(?:(?P<d>\d+)d\s+)?(?P<h>\d+):(?P<m>\d+):(?P<s>\d+(?:\.\d*)?)\s*$")


def _header_index(lines: list[str]) -> int | None:
    for k, line in enumerate(lines[:HEADER_SEARCH_LINES]):
        fields = [f.strip().lower() for f in line.split("\t")]
        if fields and fields[0] in ("rec#", "rec") and "step" in fields:
            return k
    return None


def is_maccor_text(lines: list[str]) -> bool:
    return _header_index(lines) is not None


def _seconds(path: Path, column: str, values: list[str]) -> np.ndarray:
    """Maccor's ``0d 00:01:30.88`` durations (days, hours, minutes, seconds) as seconds."""
    out = np.empty(len(values))
    for n, text in enumerate(values):
        m = _DURATION.match(text)
        if m is None:
            raise RecordingError(f"{path}: column {column!r}: {text!r} is not a Maccor time like '0d 00:01:30.5'")
        out[n] = int(m["d"] or 0) * 86400 + int(m["h"]) * 3600 + int(m["m"]) * 60 + float(m["s"])
    return out


def read_maccor_text(path: Path) -> Recording:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RecordingError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    lines = text.splitlines()
    head = _header_index(lines)
    if head is None:
        raise RecordingError(f"{path}: no Maccor header row (one starting 'Rec#' or 'Rec', with 'Step')")
    header = [f.strip() for f in lines[head].split("\t")]
    rows = [line.split("\t") for line in lines[head + 1 :] if line.strip()]
    if not rows:
        raise RecordingError(f"{path}: a Maccor export with no data rows")
    short = next((head + 2 + n for n, r in enumerate(rows) if len(r) < len(header) - 1), None)
    if short is not None:
        raise RecordingError(f"{path}: line {short} has fewer fields than the header's {len(header)}")
    values = [[r[k].strip() if k < len(r) else "" for r in rows] for k in range(len(header))]
    lower = [h.lower() for h in header]

    def find(*names: str) -> int | None:
        return next((lower.index(n) for n in names if n in lower), None)

    # Time: 'Test (Min)' style, a unit in its name; or 'Test Time' as durations.
    time_s = None
    for k, label in enumerate(header):
        m = _WITH_UNIT.match(label)
        if m and m["name"].strip().lower() in ("test", "test time", "testtime"):
            time_s = numbers(path, label, values[k]) * unit_factor(path, label, m["unit"], "time")
            break
    if time_s is None:
        k_time = find("test time", "testtime")
        if k_time is None:
            raise RecordingError(
                f"{path}: no Maccor test time column ('Test (Min)', 'Test Time'); the header is {header}"
            )
        time_s = _seconds(path, header[k_time], values[k_time])
    quantities: dict[str, np.ndarray] = {}
    for k, label in enumerate(header):
        m = _WITH_UNIT.match(label)
        name, unit = (m["name"].strip().lower(), m["unit"]) if m else (label.lower(), None)
        if name not in _NAMED or _NAMED[name][0] in quantities:
            continue
        quantity, dimension, default = _NAMED[name]
        quantities[quantity] = numbers(path, label, values[k]) * unit_factor(path, label, unit or default, dimension)
    for quantity, example in (("voltage", "Volts"), ("current", "Amps")):
        if quantity not in quantities:
            raise RecordingError(f"{path}: no Maccor {quantity} column (like {example!r}); the header is {header}")
    k_state = find("state", "md")
    if k_state is None:
        raise RecordingError(f"{path}: no Maccor 'State' (or 'MD') column, which says charge or discharge")
    state = np.array([s.upper()[:1] for s in values[k_state]])
    sign = np.where(state == "C", 1.0, np.where(state == "D", -1.0, 0.0))
    known = np.isin(state, ["C", "D", "R"])
    raw_i = quantities["current"]
    current = np.where(known, sign * np.abs(raw_i), raw_i)
    q = None
    if "capacity" in quantities:
        q = np.cumsum(
            np.where(known, sign, np.sign(raw_i)) * _capacity_increments(time_s, raw_i, quantities["capacity"], state)
        )
    k_step, k_cycle = find("step"), find("cyc#", "cycle", "cycle c")
    labels = [numbers(path, header[c], values[c]) for c in (k_step, k_cycle) if c is not None]
    step = steps_from_labels(*labels, state)
    rec = finish(
        path.stem,
        "maccor-text",
        time_s,
        quantities["voltage"],
        current,
        step,
        None,
        q,
        _temperature(path, header, values),
    )
    if q is None:
        rec.notes.append("no Maccor capacity column: charge counted from the current")
    return rec


def _capacity_increments(
    time_s: np.ndarray, current_A: np.ndarray, capacity_Ah: np.ndarray, state: np.ndarray
) -> np.ndarray:
    """The unsigned charge each row adds. The exports seen restart the counter with each step (it falls to
    near zero where the state changes); one that instead runs on through a change of state is read as running
    on: where the state changes and the counter did not fall, whichever reading (restarted or running on) is
    nearer the current times the interval is taken."""
    c = np.nan_to_num(capacity_Ah)
    new_state = np.concatenate([[False], state[1:] != state[:-1]])
    previous = np.concatenate([c[:1], c[:-1]])
    moved = np.abs(current_A) * np.diff(time_s, prepend=time_s[:1]) / 3600.0
    runs_on = new_state & (c >= previous) & (np.abs(c - previous - moved) < np.abs(c - moved))
    return counter_increments(c, new_state & ~runs_on)


def _temperature(path: Path, header: list[str], values: list[list[str]]) -> np.ndarray | None:
    """The first auxiliary channel whose unit column says C (a thermocouple); Maccor writes an unplugged one
    as about -2500 C, which is no reading."""
    for k, label in enumerate(header[:-1]):
        if label.lower().startswith("aux") and header[k + 1].lower() == "units":
            units = {u.strip().upper() for u in values[k + 1] if u.strip()}
            if units == {"C"}:
                t = numbers(path, label, values[k])
                return np.where(t < -273.15, np.nan, t)
    return None
