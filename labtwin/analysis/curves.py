"""The per-cycle curves every plot of a cycling run draws: V against charge per cycle, and dQ/dV per half cycle.

One definition for the CLI's PNGs (labtwin.analysis.plots) and the dashboard's run page, built on
labtwin.analysis.cycles: the samples' own cycle column, the agent's per-sample charge increments
(``charge_increments``) and the direction each step drove (``charge_direction``).

- V-Q: per cycle (1, 2, ...), the net charge since the cycle began (Ah, + = into the cell) at each sample.
- dQ/dV: per half cycle, the steps of a cycle that moved charge one way, galvanostatic part only: constant
  voltage holds, and the CV tail of a CC-CV step (current below half its median), are left out, because at a
  fixed voltage dQ/dV is a spike, not a phase transition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labtwin.analysis.cycles import Direction, charge_direction, charge_increments
from labtwin.analysis.cycling import differential_capacity
from labtwin.documents import StepEvent, StepKind

MIN_DQDV_SAMPLES = 10  # labtwin.analysis.cycling.differential_capacity needs at least this many


def sample_charge_Ah(samples: dict[str, np.ndarray]) -> np.ndarray:
    """The signed charge each sample adds (Ah, + = into the cell), by the agent's own rule."""
    return charge_increments(
        samples["time_s"],
        samples.get("current_A", np.zeros(len(samples["time_s"]))),
        samples["step"],
        samples.get("capacity_Ah"),
    )


def rows_by_value(values: np.ndarray) -> dict[int, np.ndarray]:
    """Each value's sample indices, in order: one sort instead of a scan of every sample per cycle or step."""
    values = np.asarray(values)
    if len(values) and np.all(values[1:] >= values[:-1]):  # a run's cycles and steps only grow: no sort
        starts = np.flatnonzero(np.diff(values)) + 1
        return {int(values[a]): np.arange(a, b) for a, b in zip(np.r_[0, starts], np.r_[starts, len(values)])}
    order = np.argsort(values, kind="stable")
    keys, starts = np.unique(values[order], return_index=True)
    return {int(k): rows for k, rows in zip(keys, np.split(order, starts[1:]))}


def cycle_charge_Ah(samples: dict[str, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per cycle (1, 2, ...): the sample indices and the net charge since the cycle began (Ah, + = into the
    cell) at each."""
    dq = sample_charge_Ah(samples)
    out = {}
    for cycle, rows in rows_by_value(samples["cycle"]).items():
        if cycle <= 0:
            continue  # before any current flowed: no charge to draw against
        out[cycle] = (rows, np.cumsum(dq[rows]))
    return out


def half_cycle_rows(samples: dict[str, np.ndarray], events: list[StepEvent]) -> list[tuple[int, Direction, np.ndarray]]:
    """(cycle, direction, sample indices) of each half cycle's galvanostatic part, in cycle order."""
    step_of = np.asarray(samples["step"])
    current = np.asarray(samples.get("current_A", np.zeros(len(step_of))))
    rows_of_step = rows_by_value(step_of)
    no_rows = np.zeros(0, dtype=int)
    groups: dict[tuple[int, Direction], list[np.ndarray]] = {}
    for ev in sorted((e for e in events if e.event == "ended"), key=lambda e: e.step_index):
        direction = charge_direction(ev)
        if direction is None or ev.cycle <= 0 or ev.step not in (StepKind.cc, StepKind.cccv, StepKind.cp):
            continue
        rows = rows_of_step.get(ev.step_index, no_rows)
        if ev.step is StepKind.cccv and len(rows):
            magnitude = np.abs(current[rows])
            rows = rows[magnitude >= 0.5 * np.median(magnitude)]
        groups.setdefault((ev.cycle, direction), []).append(rows)
    return [(c, d, np.concatenate(parts)) for (c, d), parts in sorted(groups.items())]


@dataclass
class HalfCycleDqDv:
    cycle: int
    direction: Direction
    voltage_V: np.ndarray
    dq_dv_Ah_per_V: np.ndarray  # signed: + for a charge, - for a discharge, as plots draw it


def half_cycle_dqdv(samples: dict[str, np.ndarray], events: list[StepEvent], points: int = 400) -> list[HalfCycleDqDv]:
    """dQ/dV of every half cycle with enough finite samples (labtwin.analysis.cycling.differential_capacity)."""
    dq = sample_charge_Ah(samples)
    voltage = np.asarray(samples["voltage_V"], dtype=float)
    out = []
    for cycle, direction, rows in half_cycle_rows(samples, events):
        rows = rows[np.isfinite(voltage[rows])]
        if len(rows) < MIN_DQDV_SAMPLES or np.ptp(voltage[rows]) <= 0:
            continue
        curve = differential_capacity(voltage[rows], np.cumsum(dq[rows]), points=points)
        sign = 1.0 if direction == "charge" else -1.0
        out.append(HalfCycleDqDv(cycle, direction, curve.voltage_V, sign * curve.dq_dv_Ah_per_V))
    return out
