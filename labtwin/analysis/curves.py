"""Half cycles of a recording: the voltage against the charge passed since the half cycle began (V-Q curves).

What a battery engineer overlays cycle on cycle. A half cycle is the stretch of one cycle (the cycle each
sample carries, labtwin.analysis.cycles' numbering) in which charge moves one way; its capacity counts from
zero at its start, by the same per-sample increments the agent counts (``charge_increments``). Samples that
move no charge (rests, the dead band of a hold) stay in the half cycle they sit in, so a relaxation shows as
a vertical tail, as on a cycler's plot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labtwin.analysis.cycles import Direction, charge_increments
from labtwin.analysis.cycling import differential_capacity

MIN_MOVING_CHARGE_AH = 1e-12  # an increment below this moves no charge (numerical noise of a rest)


@dataclass
class HalfCycle:
    cycle: int
    direction: Direction
    time_s: np.ndarray
    voltage_V: np.ndarray
    capacity_Ah: np.ndarray  # charge passed since the half cycle began, positive either way


def half_cycles(samples: dict[str, np.ndarray]) -> list[HalfCycle]:
    """The half cycles of a run's samples (``Store.samples`` columns), in run order."""
    t = np.asarray(samples["time_s"], dtype=float)
    if len(t) == 0:
        return []
    dq = charge_increments(t, samples["current_A"], samples["step"], samples.get("capacity_Ah"))
    dq = np.nan_to_num(dq)
    moving = np.abs(dq) > MIN_MOVING_CHARGE_AH
    sign = np.where(moving, np.sign(dq), 0.0)
    # Carry the last moving direction forward over samples that move nothing (rests stay where they are).
    last = np.maximum.accumulate(np.where(moving, np.arange(len(t)), -1))
    carried = np.where(last >= 0, sign[np.maximum(last, 0)], 0.0)
    cycle = np.asarray(samples["cycle"], dtype=int)
    boundary = np.flatnonzero((np.diff(carried) != 0) | (np.diff(cycle) != 0)) + 1
    out: list[HalfCycle] = []
    for a, b in zip(np.concatenate([[0], boundary]), np.concatenate([boundary, [len(t)]])):
        s = carried[a]
        if s == 0 or cycle[a] <= 0:
            continue
        q = np.cumsum(np.abs(dq[a:b]))
        out.append(
            HalfCycle(
                int(cycle[a]), "charge" if s > 0 else "discharge", t[a:b], np.asarray(samples["voltage_V"][a:b]), q
            )
        )
    return out


def differential_capacity_of(half: HalfCycle, points: int = 200) -> tuple[np.ndarray, np.ndarray] | None:
    """dQ/dV of a half cycle (labtwin.analysis.cycling), or None where it has too few finite samples."""
    ok = np.isfinite(half.voltage_V)
    if ok.sum() < 10 or np.ptp(half.voltage_V[ok]) <= 0:
        return None
    d = differential_capacity(half.voltage_V[ok], half.capacity_Ah[ok], points=points)
    return d.voltage_V, d.dq_dv_Ah_per_V
