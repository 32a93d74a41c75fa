"""Export a run's samples with explicit, unit-bearing column names.

- csv: labtwin's own names (time_s, voltage_V, current_A, capacity_Ah, ...).
- parquet: the same columns, for analysis at scale.
- bdf: the Battery Data Alliance's Battery Data Format (CSV): ``Test Time / s``,
  ``Voltage / V``, ``Current / A`` (required), ``Cycle Count / 1``,
  ``Step Count / 1``, ``Ambient Temperature / degC`` and the net charge.
  One cell per file, as BDF asks.

The cycle column (BDF's ``Cycle Count``) is the samples' own electrochemical
cycle (labtwin.analysis.cycles), never the protocol's loop counter, so
``analyze cycling`` on any export gives the run's figures.

All formats: positive current charges the cell (stated in a header comment
for CSV and in the Parquet schema metadata).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SIGN_NOTE = "positive current charges the cell"

BDF_COLUMNS = {
    "time_s": "Test Time / s",
    "voltage_V": "Voltage / V",
    "current_A": "Current / A",
    "capacity_Ah": "Net Charge / Ah",
    "temperature_C": "Ambient Temperature / degC",
    "cycle": "Cycle Count / 1",
    "step": "Step Count / 1",
}
FORMATS = ("csv", "parquet", "bdf")


def export_samples(samples: dict[str, np.ndarray], path: Path, fmt: str, unix_start_s: float | None = None) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(samples)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: samples[k] for k in names})
        table = table.replace_schema_metadata({"labtwin.sign_convention": SIGN_NOTE})
        pq.write_table(table, path)
        return path
    header = names
    columns = [samples[k] for k in names]
    if fmt == "bdf":
        header = [BDF_COLUMNS[k] for k in names]
        if unix_start_s is not None:
            header.append("Unix Time / s")
            columns.append(samples["time_s"] + unix_start_s)
    with path.open("w", newline="") as fh:
        if fmt == "csv":
            fh.write(f"# labtwin samples; {SIGN_NOTE}; capacity_Ah is net charge since run start\n")
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(zip(*(c.tolist() for c in columns)))
    return path
