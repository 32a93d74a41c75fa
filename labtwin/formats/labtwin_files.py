"""labtwin's own recordings: ``samples.csv`` (``dryrun --out``, ``labtwin export``) with the ``eis.csv`` beside
it when there is one, and the Parquet export (the same columns, in a table)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from labtwin.formats.recording import Recording, RecordingError, finish


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    if len(rows) < 2:
        raise RecordingError(f"{path}: no data rows")
    return rows[0], rows[1:]


def read_labtwin_csv(path: Path) -> Recording:
    header, rows = _csv_rows(path)
    col = {name.strip(): k for k, name in enumerate(header)}

    def column(*names: str, required: bool = True, dtype=float):
        for name in names:
            if name in col:
                try:
                    return np.array([dtype(float(r[col[name]])) for r in rows])
                except (ValueError, IndexError) as exc:
                    raise RecordingError(f"{path}: column {name!r} has a value that is not a number ({exc})") from exc
        if required:
            raise RecordingError(f"{path}: no column {names[0]!r}; the header is {header}")
        return None

    missing = [name for name in ("time_s", "voltage_V", "current_A", "step") if name not in col]
    if missing:
        raise RecordingError(
            f"{path}: columns {missing} missing; a labtwin recording has time_s, voltage_V, current_A, "
            f"step (and capacity_Ah, cycle); a BDF file has 'Test Time / s'. The header is {header}"
        )
    t = column("time_s")
    step = column("step", dtype=int)
    rec = finish(
        path.stem,
        "labtwin-csv",
        t,
        column("voltage_V"),
        column("current_A"),
        step,
        column("cycle", required=False, dtype=int),
        column("capacity_Ah", required=False),
        column("temperature_C", required=False),
    )
    eis = path.with_name("eis.csv")
    if eis.exists():
        e_header, e_rows = _csv_rows(eis)
        ec = {name.strip(): k for k, name in enumerate(e_header)}
        e_step = np.array([int(float(r[ec["step"]])) for r in e_rows])
        for s in np.unique(e_step):
            rows_z = [r for r, st in zip(e_rows, e_step) if st == s]
            where = np.nonzero(rec.step == s)[0]
            if len(where) != len(rows_z):
                raise RecordingError(
                    f"{eis}: step {s} has {len(rows_z)} impedance points but {path.name} has {len(where)} rows"
                )
            rec.frequency_Hz[where] = [float(r[ec["frequency_Hz"]]) for r in rows_z]
            rec.z_real_ohm[where] = [float(r[ec["z_real_ohm"]]) for r in rows_z]
            rec.z_imag_ohm[where] = [float(r[ec["z_imag_ohm"]]) for r in rows_z]
    return rec


def read_labtwin_parquet(path: Path) -> Recording:
    """labtwin's Parquet export: the csv's columns, in a table."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable Parquet file ({exc})") from exc
    names = set(table.column_names)
    missing = [name for name in ("time_s", "voltage_V", "current_A", "step") if name not in names]
    if missing:
        raise RecordingError(f"{path}: columns {missing} missing; the columns are {sorted(names)}")

    def column(name: str, dtype=float):
        return table.column(name).to_numpy(zero_copy_only=False).astype(dtype) if name in names else None

    return finish(
        path.stem,
        "labtwin-parquet",
        column("time_s"),
        column("voltage_V"),
        column("current_A"),
        column("step", int),
        column("cycle", int),
        column("capacity_Ah"),
        column("temperature_C"),
    )
