"""Recorded data back onto the bus, as the documents an agent would have published.

``labtwin replay FILE`` turns a recording into RunStart, StepEvent and
SampleBatch documents and publishes them, so the twin and its detectors run
on it exactly as they do live. The files are read by labtwin.formats (one module per format).

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

import math
import uuid
from collections.abc import Iterator

import numpy as np

from labtwin.analysis.cycles import charge_direction, charge_increments, number_steps
from labtwin.documents import EndReason, RunStart, RunStop, SampleBatch, StepEvent, StepKind, StepStats
from labtwin.formats import Recording, RecordingError, read_recording

__all__ = ["Recording", "RecordingError", "documents", "read_recording"]


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
    rec: Recording,
    *,
    lab: str,
    channel: str,
    cell_id: str,
    run_id: str | None = None,
    batch_size: int = 200,
    nominal_capacity_Ah: float | None = None,
) -> Iterator[RunStart | StepEvent | SampleBatch | RunStop]:
    """The documents an agent would have published for this recording, in publishing order.

    The RunStart carries the cell's nominal capacity (``metadata['nominal_capacity_Ah']``): the one given, else
    inferred from the data as the largest charge one galvanostatic step moved (a full half cycle), and said so
    (``nominal_capacity_source``). The twin's detectors scale with it, so a replay without a model still
    watches a 52 uAh film at its own scale, not at the 1 Ah a twin assumes when told nothing.
    """
    run_id = run_id or f"replay-{uuid.uuid4().hex[:8]}"
    n = len(rec)
    if n == 0:
        raise RecordingError(f"{rec.name}: nothing to replay")
    t0 = float(rec.time_s[0])
    time_s = rec.time_s - t0
    boundaries = np.nonzero(np.diff(rec.step) != 0)[0] + 1
    segments = np.split(np.arange(n), boundaries)
    scale_A = max(float(np.max(np.abs(rec.current_A))), 1e-12)
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
    metadata = {"source_format": rec.source_format}
    if nominal_capacity_Ah is not None:
        metadata.update(nominal_capacity_Ah=repr(float(nominal_capacity_Ah)), nominal_capacity_source="given")
    else:
        moved = [max(st.charge_Ah, st.discharge_Ah) for kind, _, st in steps if kind in (StepKind.cc, StepKind.cccv)]
        if moved and max(moved) > 0:
            metadata.update(
                nominal_capacity_Ah=repr(max(moved)),
                nominal_capacity_source="inferred from the data: the largest charge of one galvanostatic step",
            )
    yield RunStart(
        run_id=run_id,
        lab=lab,
        channel=channel,
        cell_id=cell_id,
        protocol=f"replay of {rec.name}",
        n_steps=len(segments),
        metadata=metadata,
    )
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
