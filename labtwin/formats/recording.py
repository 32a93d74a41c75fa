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


UNSIGNED_TREND_V = 0.005  # a step whose voltage moves less than this drives in the direction of the one before


def sign_unsigned_current(voltage_V: np.ndarray, current_A: np.ndarray, step: np.ndarray) -> np.ndarray | None:
    """Signed current for a file whose current is a magnitude (never negative, though the voltage falls under
    load), else None. Some exports write the magnitude and keep the direction in a state column the file no
    longer has (the Battery Data Alliance's own Maccor reference file: +0.5 A on a discharge from 3.1 to 2.5 V).
    Each step driving current takes the sign of its voltage trend (rising: charge); a constant-voltage step,
    whose voltage does not move, continues the direction of the step before it, as the CV of a CC-CV does."""
    i = np.asarray(current_A, dtype=float)
    v = np.asarray(voltage_V, dtype=float)
    finite = np.isfinite(i)
    if not finite.any() or np.any(i[finite] < 0):
        return None
    scale = float(np.max(i[finite]))
    if scale <= 0:
        return None
    boundaries = np.flatnonzero(np.diff(step) != 0) + 1
    signs: list[tuple[np.ndarray, float]] = []
    falling_under_load = False
    previous = 1.0
    for rows in np.split(np.arange(len(i)), boundaries):
        driving = rows[np.nan_to_num(i[rows]) > 1e-3 * scale]
        if len(driving) < 2:
            continue
        trend = float(v[driving[-1]] - v[driving[0]])
        sign = previous if abs(trend) < UNSIGNED_TREND_V else float(np.sign(trend))
        falling_under_load |= sign < 0
        signs.append((rows, sign))
        previous = sign
    if not falling_under_load:
        return None  # only charging (or nothing moved): the magnitudes are the signed values
    out = i.copy()
    for rows, sign in signs:
        out[rows] = sign * i[rows]
    return out


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
