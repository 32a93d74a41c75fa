"""Export a run's samples with explicit, unit-bearing column names.

- csv: labtwin's own names (time_s, voltage_V, current_A, capacity_Ah, ...).
- parquet: the same columns, for analysis at scale.
- bdf: the Battery Data Alliance's Battery Data Format (CSV), its human labels
  (labtwin.formats.bdf): ``Test Time / s``, ``Voltage / V``, ``Current / A``
  (required), ``Cycle Count / 1``, ``Step Count / 1``, ``Net Capacity / Ah``,
  ``Ambient Temperature / degC``. One cell per file, as BDF asks; a missing
  reading is an empty field. ``labtwin replay``, ``analyze`` and ``import``
  read it back as it was written.

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

from labtwin.formats.bdf import UNIX_TIME, export_header

SIGN_NOTE = "positive current charges the cell"

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
        header = export_header(names)
        if unix_start_s is not None:
            header.append(UNIX_TIME.label)
            columns.append(samples["time_s"] + unix_start_s)
    with path.open("w", newline="") as fh:
        if fmt == "csv":
            fh.write(f"# labtwin samples; {SIGN_NOTE}; capacity_Ah is net charge since run start\n")
        writer = csv.writer(fh)
        writer.writerow(header)
        rows = zip(*(c.tolist() for c in columns))
        if fmt == "bdf":  # BDF leaves a missing reading empty
            rows = ([("" if isinstance(x, float) and x != x else x) for x in row] for row in rows)  # type: ignore[assignment]
        writer.writerows(rows)
    return path
