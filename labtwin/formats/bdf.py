"""The Battery Data Alliance's Battery Data Format (BDF): CSV or Parquet, plain or gzip, in either column style.

BDF names each quantity twice: a human label with its unit (``Test Time / s``) and a machine-readable key with
the canonical unit baked in (``test_time_second``), the normative form of the reference files. Both are read;
a human label in another unit of the same dimension (``Current / mA``, ``Test Time / h``) is converted. The
sign is BDF's and labtwin's: positive current charges the cell.

What labtwin takes from a BDF file: time, voltage, current (required); the cycle (``cycle_count``); the step
(``step_count``, else ``step_index``/``step_id`` counted on each change, else the current's regime); the net
charge (``net_capacity_ah``), else the current integrated by the agent's rule; a temperature (ambient, else
the first probe). labtwin writes its export with the same names (``labtwin export --format bdf``), so its own
files read back identically.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labtwin.formats.cycler_columns import UNITS
from labtwin.formats.recording import Recording, RecordingError, finish, sign_unsigned_current, steps_from_current


@dataclass(frozen=True)
class Quantity:
    label: str  # the human label, canonical unit included
    key: str  # the machine-readable key
    dimension: str


# The quantities labtwin reads or writes, in BDF's canonical units.
TEST_TIME = Quantity("Test Time / s", "test_time_second", "time")
VOLTAGE = Quantity("Voltage / V", "voltage_volt", "voltage")
CURRENT = Quantity("Current / A", "current_ampere", "current")
UNIX_TIME = Quantity("Unix Time / s", "unix_time_second", "time")
CYCLE_COUNT = Quantity("Cycle Count / 1", "cycle_count", "count")
STEP_COUNT = Quantity("Step Count / 1", "step_count", "count")
STEP_INDEX = Quantity("Step Index / 1", "step_index", "count")
STEP_ID = Quantity("Step ID / 1", "step_id", "count")
NET_CAPACITY = Quantity("Net Capacity / Ah", "net_capacity_ah", "charge")
AMBIENT_TEMPERATURE = Quantity("Ambient Temperature / degC", "ambient_temperature_celsius", "temperature")
TEMPERATURE_T1 = Quantity("Temperature T1 / degC", "temperature_t1_celsius", "temperature")

# labtwin's sample columns as BDF quantities (the export's names).
EXPORT_QUANTITIES = {
    "time_s": TEST_TIME,
    "voltage_V": VOLTAGE,
    "current_A": CURRENT,
    "capacity_Ah": NET_CAPACITY,
    "temperature_C": AMBIENT_TEMPERATURE,
    "cycle": CYCLE_COUNT,
    "step": STEP_COUNT,
}

# Labels earlier labtwin exports wrote, read as what they meant.
_OLD_LABELS = {"net charge": NET_CAPACITY}

# Units and their factors: the one table every vendor reader uses (labtwin.formats.cycler_columns).
_UNITS = UNITS

_LABEL = re.compile(r"^\s*(?P<name>.+?)\s*/\s*(?P<unit>\S+)\s*$")


def _match(header: list[str], quantity: Quantity) -> tuple[int, float, float] | None:
    """(column index, factor, offset) of a quantity in a header, in either style and any known unit."""
    want_name = quantity.label.split(" / ")[0].strip().lower()
    for k, raw in enumerate(header):
        name = raw.strip()
        if name.lower() == quantity.key:
            return k, 1.0, 0.0
        m = _LABEL.match(name)
        if not m:
            continue
        label_name = m["name"].lower()
        if label_name != want_name and _OLD_LABELS.get(label_name) != quantity:
            continue
        unit = m["unit"].lower()
        if quantity.dimension == "temperature" and unit == "k":
            return k, 1.0, -273.15
        dimension, factor = _UNITS.get(unit, ("", 0.0))
        if dimension != quantity.dimension:
            raise RecordingError(
                f"column {name!r}: unit {m['unit']!r} is not a unit of {quantity.dimension} labtwin converts "
                f"(write it as {quantity.label!r} or {quantity.key!r})"
            )
        return k, factor, 0.0
    return None


def is_bdf_header(header: list[str]) -> bool:
    return all(_match(header, q) is not None for q in (TEST_TIME, VOLTAGE, CURRENT))


def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", newline="")
    return path.open(newline="")


def _table(path: Path) -> tuple[list[str], dict[int, np.ndarray]]:
    """The header and a reader of numeric columns, from CSV (pyarrow's C reader) or Parquet."""
    import pyarrow as pa

    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".parquet.gz")):
            import pyarrow.parquet as pq

            table = pq.read_table(gzip.open(path) if name.endswith(".gz") else path)
        else:
            import pyarrow.csv as pacsv

            with _open_text(path) as fh:
                skip = 0
                for line in fh:
                    if line.startswith("#") or not line.strip():
                        skip += 1
                        continue
                    break
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(skip_rows=skip))
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise RecordingError(f"{path}: not a readable BDF table ({exc})") from None
    header = [str(c) for c in table.column_names]
    columns: dict[int, np.ndarray] = {}
    for k, column in enumerate(table.columns):
        try:
            columns[k] = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # a text column (step_type, a date): not one labtwin reads as a number
    return header, columns


def read_bdf(path: Path) -> Recording:
    header, columns = _table(path)

    def column(quantity: Quantity, required: bool = False) -> np.ndarray | None:
        try:
            found = _match(header, quantity)
        except RecordingError as exc:
            raise RecordingError(f"{path}: {exc}") from None
        if found is None:
            if required:
                raise RecordingError(
                    f"{path}: no {quantity.label!r} (or {quantity.key!r}) column; a BDF file has test time, "
                    f"voltage and current. The header is {header}"
                )
            return None
        k, factor, offset = found
        if k not in columns:
            raise RecordingError(f"{path}: column {header[k]!r} holds text where BDF has numbers")
        return columns[k] * factor + offset

    t = column(TEST_TIME, required=True)
    v = column(VOLTAGE, required=True)
    i = column(CURRENT, required=True)
    assert t is not None and v is not None and i is not None
    finite = np.isfinite(t)
    if not np.any(finite):
        raise RecordingError(f"{path}: no data rows with a test time")
    notes: list[str] = []
    step = column(STEP_COUNT)
    if step is None:
        index = next((c for c in (column(STEP_INDEX), column(STEP_ID)) if c is not None), None)
        cycle_for_steps = column(CYCLE_COUNT)
        if index is not None:
            # A protocol's step number repeats every cycle: a new step wherever it (or the cycle) changes.
            changed = np.diff(index) != 0
            if cycle_for_steps is not None:
                changed |= np.diff(cycle_for_steps) != 0
            step = np.concatenate([[0], np.cumsum(changed)])
        else:
            step = steps_from_current(i)
            notes.append("no step column: steps counted from the current's changes of regime")
    signed = sign_unsigned_current(v, i, np.nan_to_num(step).astype(int))
    if signed is not None:
        i = signed
        notes.append(
            "the current is never negative though the voltage falls under load: each step's sign was taken from "
            "its voltage trend (rising = charge; a constant-voltage step continues the step before)"
        )
    cycle = column(CYCLE_COUNT)
    temperature = column(AMBIENT_TEMPERATURE)
    if temperature is None:
        temperature = column(TEMPERATURE_T1)
    unix = column(UNIX_TIME)
    unix_start = float(unix[0] - t[0]) if unix is not None and np.isfinite(unix[0]) else None
    rec = finish(
        _stem(path),
        "bdf",
        t,
        v,
        i,
        np.nan_to_num(step).astype(int),
        None if cycle is None else np.nan_to_num(cycle).astype(int),
        column(NET_CAPACITY),
        temperature,
        unix_start_s=unix_start,
    )
    rec.notes.extend(notes)
    return rec


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".csv", ".parquet", ".bdf"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def export_header(names: list[str]) -> list[str]:
    """The BDF labels of labtwin's sample columns, in the order given."""
    return [EXPORT_QUANTITIES[n].label for n in names]
