"""Cycling: per-cycle capacities, Coulombic efficiency, energy, mean polarization, and dQ/dV.

Cycles, capacities and Coulombic efficiency are labtwin.analysis.cycles'
(``analyze cycling`` reports them): a file from any cycler, replayed into
step events, gets the same cycle numbers and figures as a labtwin run.

dQ/dV: each half cycle's charge is put on a uniform voltage grid (the curve
is monotonic within a half cycle once its noise is averaged), and the
derivative is taken with a Savitzky-Golay filter, which smooths without
shifting peaks (the phase transitions dQ/dV is read for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import savgol_filter


@dataclass
class DifferentialCapacity:
    voltage_V: np.ndarray
    dq_dv_Ah_per_V: np.ndarray


def differential_capacity(voltage_V, capacity_Ah, points: int = 400, window: int = 21) -> DifferentialCapacity:
    """dQ/dV of one half cycle (voltage and charge through it, in measurement order)."""
    v = np.asarray(voltage_V, dtype=float)
    q = np.asarray(capacity_Ah, dtype=float)
    if len(v) < 10:
        raise ValueError("dQ/dV needs at least 10 samples of a half cycle")
    order = np.argsort(v, kind="stable")
    v_sorted, q_sorted = v[order], q[order]
    grid = np.linspace(v_sorted[0], v_sorted[-1], points)
    # Averaging repeated voltages first makes the curve single-valued for the interpolation.
    unique_v, inverse = np.unique(v_sorted, return_inverse=True)
    mean_q = np.bincount(inverse, weights=q_sorted) / np.bincount(inverse)
    q_grid = np.interp(grid, unique_v, mean_q)
    window = min(window | 1, (points - 1) | 1)
    dq = savgol_filter(q_grid, window, 3, deriv=1, delta=grid[1] - grid[0])
    return DifferentialCapacity(grid, np.abs(dq))
