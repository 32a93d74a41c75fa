"""A recording as every reader returns it: numpy columns named with their units, labtwin's sign convention.

Current is positive into the cell (a charge); ``capacity_Ah`` is the net charge since the recording began, the
file's own where it has one, else counted from the current by the agent's rule (labtwin.analysis.cycles), so a
sparse file's figures are the instrument's and a dense one's agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labtwin.analysis.cycles import charge_increments


class RecordingError(ValueError):
    """A file labtwin cannot read, with the file, the column or field, and what was expected."""


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
    has_cycle: bool = True  # False: the file numbers no cycles; labtwin.data.replay counts them from the data
    unix_start_s: float | None = None  # the wall time of time_s == 0, where the file says it
    notes: list[str] = field(default_factory=list)  # what the reader inferred, for the user to read

    def __len__(self) -> int:
        return len(self.time_s)


def capacity_from_current(time_s: np.ndarray, current_A: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Net charge counted as the agent counts it (labtwin.analysis.cycles.charge_increments)."""
    return np.cumsum(charge_increments(time_s, current_A, step))


def steps_from_current(current_A: np.ndarray, scale_A: float | None = None) -> np.ndarray:
    """Step numbers for a file that has none: a new step wherever the current changes regime (charge, discharge,
    rest), the way a cycler's own step counter moves on a simple protocol."""
    i = np.asarray(current_A, dtype=float)
    if not len(i):
        return np.zeros(0, dtype=int)
    scale = scale_A if scale_A is not None else max(float(np.nanmax(np.abs(i))), 1e-12)
    regime = np.sign(np.where(np.abs(i) <= 1e-3 * scale, 0.0, i))
    return np.concatenate([[0], np.cumsum(regime[1:] != regime[:-1])]).astype(int)


def finish(
    name: str,
    fmt: str,
    t,
    v,
    i,
    step,
    cycle=None,
    q=None,
    temp=None,
    f=None,
    zr=None,
    zi=None,
    unix_start_s: float | None = None,
) -> Recording:
    """A Recording from a reader's columns, with what the file lacks filled the one way labtwin fills it."""
    n = len(t)

    def nan() -> np.ndarray:  # one array each: the readers fill them in place
        return np.full(n, np.nan)

    time_s = np.asarray(t, float)
    current_A = np.asarray(i, float)
    steps = np.asarray(step, int)
    return Recording(
        name=name,
        time_s=time_s,
        voltage_V=np.asarray(v, float),
        current_A=current_A,
        capacity_Ah=np.asarray(q, float) if q is not None else capacity_from_current(time_s, current_A, steps),
        # No sensor in the file: no reading (NaN, stored as none), never an invented room temperature.
        temperature_C=np.asarray(temp, float) if temp is not None else nan(),
        step=steps,
        cycle=np.asarray(cycle, int) if cycle is not None else np.zeros(n, int),
        frequency_Hz=nan() if f is None else np.asarray(f, float),
        z_real_ohm=nan() if zr is None else np.asarray(zr, float),
        z_imag_ohm=nan() if zi is None else np.asarray(zi, float),
        source_format=fmt,
        has_cycle=cycle is not None,
        unix_start_s=unix_start_s,
    )
