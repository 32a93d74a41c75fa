"""Recorded data back onto the bus, as the documents an agent would have published.

``labtwin replay FILE`` turns a recording into RunStart, StepEvent and
SampleBatch documents and publishes them, so the twin and its detectors run
on it exactly as they do live. Readers:

- labtwin's own ``samples.csv`` (dryrun --out, ``labtwin export``), with the
  ``eis.csv`` beside it when there is one;
- labtwin's Parquet export (the same columns as its csv);
- Battery Data Format CSV (``Test Time / s``, ``Voltage / V``, ``Current / A``,
  ``Step Count / 1``, ``Cycle Count / 1``, ``Net Charge / Ah``; ``labtwin export --format bdf``);
- BioLogic EC-Lab ``.mpr`` binaries, read with galvani (``Ns`` is the step,
  impedance rows carry ``freq/Hz``, ``|Z|/Ohm``, ``Phase(Z)/deg``). EC-Lab's
  ``I/mA`` is positive for oxidation at the working electrode: for a cell
  wired with its positive electrode as working electrode that is charge,
  labtwin's sign, so no flip.

Step kinds are not in these files; they are read off the data: impedance
points make an EIS step, no current a rest, a steady current a constant-
current step, a steady voltage with a decaying current a constant-voltage
hold. A constant-current step that ends at the extreme voltage of its
direction is marked as ended by its voltage limit (the twin resets its state
of charge there, as a BMS does at full and empty).

Cycles and charge are labtwin.analysis.cycles': a file that carries its
cycle (labtwin's, or a BDF file's ``Cycle Count``) keeps it; one that does
not is numbered by the same counter from the direction each step measured.
A step's charge is counted from the file's net-charge column where it has
one, so its figures are the agent's own, however sparsely it was recorded.
"""

from __future__ import annotations

import csv
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from labtwin.analysis.cycles import charge_direction, charge_increments, number_steps
from labtwin.documents import EndReason, RunStart, RunStop, SampleBatch, StepEvent, StepKind, StepStats


class RecordingError(ValueError):
    pass


@dataclass
class Recording:
    name: str
    time_s: np.ndarray
    voltage_V: np.ndarray
    current_A: np.ndarray
    capacity_Ah: np.ndarray
    temperature_C: np.ndarray
    step: np.ndarray
    cycle: np.ndarray
    frequency_Hz: np.ndarray  # NaN where the row is not an impedance point
    z_real_ohm: np.ndarray
    z_imag_ohm: np.ndarray
    source_format: str
    has_cycle: bool = True  # False: the file numbers no cycles; documents() counts them from the data

    def __len__(self) -> int:
        return len(self.time_s)


def _capacity_from_current(time_s: np.ndarray, current_A: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Net charge counted as the agent counts it (labtwin.analysis.cycles.charge_increments)."""
    return np.cumsum(charge_increments(time_s, current_A, step))


def _finish(name, fmt, t, v, i, step, cycle=None, q=None, temp=None, f=None, zr=None, zi=None) -> Recording:
    n = len(t)

    def nan() -> np.ndarray:  # one array each: the readers fill them in place
        return np.full(n, np.nan)

    return Recording(
        name=name,
        time_s=np.asarray(t, float),
        voltage_V=np.asarray(v, float),
        current_A=np.asarray(i, float),
        capacity_Ah=np.asarray(q, float)
        if q is not None
        else _capacity_from_current(np.asarray(t, float), np.asarray(i, float), np.asarray(step, int)),
        temperature_C=np.asarray(temp, float) if temp is not None else np.full(n, 25.0),
        step=np.asarray(step, int),
        cycle=np.asarray(cycle, int) if cycle is not None else np.zeros(n, int),
        frequency_Hz=nan() if f is None else np.asarray(f, float),
        z_real_ohm=nan() if zr is None else np.asarray(zr, float),
        z_imag_ohm=nan() if zi is None else np.asarray(zi, float),
        source_format=fmt,
        has_cycle=cycle is not None,
    )


def read_mpr(path: Path) -> Recording:
    try:
        from galvani import BioLogic
    except ImportError as exc:  # pragma: no cover - galvani is a dependency
        raise RecordingError("reading .mpr needs galvani: pip install galvani") from exc
    try:
        data = BioLogic.MPRfile(str(path)).data
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable EC-Lab .mpr file ({exc})") from exc
    names = data.dtype.names or ()
    for needed in ("time/s", "Ewe/V", "I/mA"):
        if needed not in names:
            raise RecordingError(f"{path}: column {needed!r} missing; columns are {list(names)}")
    step = data["Ns"] if "Ns" in names else np.zeros(len(data), int)
    f = zr = zi = None
    if "freq/Hz" in names and "|Z|/Ohm" in names and "Phase(Z)/deg" in names:
        freq = np.asarray(data["freq/Hz"], float)
        is_z = freq > 0
        modulus, phase = np.asarray(data["|Z|/Ohm"], float), np.radians(np.asarray(data["Phase(Z)/deg"], float))
        f = np.where(is_z, freq, np.nan)
        zr = np.where(is_z, modulus * np.cos(phase), np.nan)
        zi = np.where(is_z, modulus * np.sin(phase), np.nan)
    q = np.asarray(data["(Q-Qo)/mA.h"], float) / 1e3 if "(Q-Qo)/mA.h" in names else None
    return _finish(
        path.stem,
        "biologic-mpr",
        data["time/s"],
        data["Ewe/V"],
        np.asarray(data["I/mA"], float) / 1e3,
        step,
        None,
        q,
        None,
        f,
        zr,
        zi,
    )


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].startswith("#")]
    if len(rows) < 2:
        raise RecordingError(f"{path}: no data rows")
    return rows[0], rows[1:]


def read_csv(path: Path) -> Recording:
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

    if "Test Time / s" in col:  # Battery Data Format
        t = column("Test Time / s")
        return _finish(
            path.stem,
            "bdf",
            t,
            column("Voltage / V"),
            column("Current / A"),
            column("Step Count / 1", "Step Index / 1", dtype=int),
            column("Cycle Count / 1", required=False, dtype=int),
            column("Net Charge / Ah", "Charge / Ah", required=False),
            column("Temperature T1 / degC", "Ambient Temperature / degC", required=False),
        )
    missing = [name for name in ("time_s", "voltage_V", "current_A", "step") if name not in col]
    if missing:
        raise RecordingError(
            f"{path}: columns {missing} missing; a labtwin recording has time_s, voltage_V, current_A, "
            f"step (and capacity_Ah, cycle); a BDF file has 'Test Time / s'. The header is {header}"
        )
    t = column("time_s")
    step = column("step", dtype=int)
    rec = _finish(
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


def read_parquet(path: Path) -> Recording:
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

    return _finish(
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


def read_recording(path: str | Path) -> Recording:
    path = Path(path)
    if path.is_dir():
        path = path / "samples.csv"
    if not path.exists():
        raise RecordingError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".mpr":
        return read_mpr(path)
    if suffix in (".csv", ".bdf"):  # a BDF file is CSV text; `labtwin export --format bdf` names it .bdf
        return read_csv(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise RecordingError(
        f"{path}: unknown recording format {suffix!r}: labtwin reads .mpr (EC-Lab), its own samples.csv or "
        ".parquet exports, and BDF (.bdf or .csv)"
    )


def _step_kind(current_A: np.ndarray, voltage_V: np.ndarray, frequency_Hz: np.ndarray, scale_A: float) -> StepKind:
    if np.any(np.isfinite(frequency_Hz)):
        return StepKind.eis
    if np.all(np.abs(current_A) <= 1e-6 * scale_A):
        return StepKind.rest
    body = current_A[: max(1, int(0.9 * len(current_A)))]
    mean = float(np.mean(body))
    if abs(mean) > 0 and float(np.std(body)) <= 0.02 * abs(mean):
        return StepKind.cc
    if np.ptp(voltage_V) <= 0.005:
        return StepKind.cv
    if np.any(current_A > 0) and np.any(current_A < 0):
        return StepKind.cyclic_voltammetry
    return StepKind.cc


def documents(
    rec: Recording, *, lab: str, channel: str, cell_id: str, run_id: str | None = None, batch_size: int = 200
) -> Iterator[RunStart | StepEvent | SampleBatch | RunStop]:
    """The documents an agent would have published for this recording, in publishing order."""
    run_id = run_id or f"replay-{uuid.uuid4().hex[:8]}"
    n = len(rec)
    if n == 0:
        raise RecordingError(f"{rec.name}: nothing to replay")
    t0 = float(rec.time_s[0])
    time_s = rec.time_s - t0
    boundaries = np.nonzero(np.diff(rec.step) != 0)[0] + 1
    segments = np.split(np.arange(n), boundaries)
    scale_A = max(float(np.max(np.abs(rec.current_A))), 1e-12)
    yield RunStart(
        run_id=run_id,
        lab=lab,
        channel=channel,
        cell_id=cell_id,
        protocol=f"replay of {rec.name}",
        n_steps=len(segments),
        metadata={"source_format": rec.source_format},
    )
    # Every step's figures first: a file that numbers no cycles is numbered from the directions they measured.
    dq = charge_increments(rec.time_s, rec.current_A, rec.step, rec.capacity_Ah)
    steps: list[tuple[StepKind, EndReason, StepStats]] = []
    for rows in segments:
        i, v, f = rec.current_A[rows], rec.voltage_V[rows], rec.frequency_Hz[rows]
        kind = _step_kind(i, v, f, scale_A)
        step_dq = dq[rows]
        charge = float(np.sum(np.clip(step_dq, 0, None)))
        discharge = float(np.sum(np.clip(-step_dq, 0, None)))
        reason = EndReason(kind="end_condition", name="time_s")
        if kind == StepKind.cc and len(v) > 2:
            at_limit = (v[-1] >= v.max() - 1e-3) if charge > discharge else (v[-1] <= v.min() + 1e-3)
            if at_limit and abs(v[-1] - v[0]) > 0.05:
                reason = EndReason(kind="end_condition", name="voltage_V", value=float(v[-1]))
        tt = time_s[rows]
        stats = StepStats(
            duration_s=float(tt[-1] - tt[0]),
            charge_Ah=charge,
            discharge_Ah=discharge,
            energy_in_Wh=float(np.sum(np.clip(step_dq, 0, None) * v)),
            energy_out_Wh=float(np.sum(np.clip(-step_dq, 0, None) * v)),
            start_voltage_V=float(v[0]),
            end_voltage_V=float(v[-1]),
            end_current_A=float(i[-1]),
            n_samples=len(rows),
        )
        steps.append((kind, reason, stats))
    if rec.has_cycle:
        cycles = [int(rec.cycle[rows[0]]) for rows in segments]
    else:
        probe = [
            StepEvent(run_id=run_id, channel=channel, step_index=k, step=kind, event="ended", time_s=0.0, stats=stats)
            for k, (kind, _, stats) in enumerate(steps)
        ]
        cycles = number_steps(charge_direction(ev) for ev in probe)
        rec.cycle = np.concatenate([np.full(len(rows), c, dtype=int) for rows, c in zip(segments, cycles)])
    seq = 0
    for index, (rows, (kind, reason, stats), cycle) in enumerate(zip(segments, steps, cycles)):
        label = f"{kind.value} (recorded step {rec.step[rows[0]]})"
        yield StepEvent(
            run_id=run_id,
            channel=channel,
            step_index=index,
            label=label,
            cycle=cycle,
            step=kind,
            event="started",
            time_s=float(time_s[rows[0]]),
        )
        first_seq = seq
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            is_z = kind == StepKind.eis
            if is_z:
                chunk = chunk[np.isfinite(rec.frequency_Hz[chunk])]
                if not len(chunk):
                    continue
            yield SampleBatch(
                run_id=run_id,
                channel=channel,
                seq=seq,
                time_s=time_s[chunk].tolist(),
                voltage_V=_readings(rec.voltage_V[chunk]),
                current_A=_readings(rec.current_A[chunk]),
                capacity_Ah=rec.capacity_Ah[chunk].tolist(),
                temperature_C=_readings(rec.temperature_C[chunk]),
                step=[index] * len(chunk),
                cycle=[cycle] * len(chunk),
                frequency_Hz=rec.frequency_Hz[chunk].tolist() if is_z else None,
                z_real_ohm=rec.z_real_ohm[chunk].tolist() if is_z else None,
                z_imag_ohm=rec.z_imag_ohm[chunk].tolist() if is_z else None,
            )
            seq += 1
        stats = stats.model_copy(
            update={
                "first_seq": first_seq if seq > first_seq else None,
                "last_seq": seq - 1 if seq > first_seq else None,
            }
        )
        yield StepEvent(
            run_id=run_id,
            channel=channel,
            step_index=index,
            label=label,
            cycle=cycle,
            step=kind,
            event="ended",
            time_s=float(time_s[rows[-1]]),
            reason=reason,
            stats=stats,
        )
    yield RunStop(
        run_id=run_id,
        channel=channel,
        exit_status="success",
        reason="replayed",
        n_samples=n,
        n_batches=seq,
        last_seq=seq - 1,
        cell_time_s=float(time_s[-1]),
    )


def _readings(values: np.ndarray) -> list[float | None]:
    """A recorded column as a batch carries it: a missing or invalid reading (NaN in the file) is None."""
    return [None if not math.isfinite(x) else x for x in values.tolist()]
