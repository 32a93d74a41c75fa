"""Cycling: per-cycle capacities, Coulombic efficiency, energy, mean polarization, and dQ/dV.

Cycles, capacities and Coulombic efficiency are labtwin.analysis.cycles'
(``analyze cycling`` reports them): a file from any cycler, replayed into
step events, gets the same cycle numbers and figures as a labtwin run.

dQ/dV: each half cycle's charge is put on a uniform voltage grid (the curve
is monotonic within a half cycle once its noise is averaged), and the
derivative is taken with a Savitzky-Golay filter, which smooths without
shifting peaks (the phase transitions dQ/dV is read for).

The filter is linear, so it is applied as the matrix it is (built once per grid size from the local cubic
fits): a run page draws hundreds of half cycles, and scipy's edge fits cost 1.6 ms each (its import 0.5 s)
while the product costs microseconds. ``savgol_derivative_reference`` is scipy's call itself, which a test holds the
matrix to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


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
    dq = savgol_derivative(q_grid, grid[1] - grid[0], window)
    return DifferentialCapacity(grid, np.abs(dq))


SAVGOL_ORDER = 3


def _window(points: int, window: int) -> int:
    return min(window | 1, (points - 1) | 1)


@lru_cache(maxsize=8)
def _savgol_matrix(points: int, window: int) -> np.ndarray:
    """Row k: the weights that give the derivative at grid point k of the cubic least-squares fit to the window
    around it (the first or last window at the edges, as savgol_filter's mode 'interp')."""
    if window <= SAVGOL_ORDER or window > points:
        raise ValueError(f"dQ/dV needs a grid of more than {SAVGOL_ORDER + 1} points (got {points})")
    half = window // 2
    t = np.arange(window, dtype=float) - half  # centred: the fit's conditioning does not grow with the window
    fit = np.linalg.pinv(np.vander(t, SAVGOL_ORDER + 1, increasing=True))  # (order+1, window): values -> coeffs
    powers = np.arange(SAVGOL_ORDER + 1)
    matrix = np.zeros((points, points))
    for k in range(points):
        start = min(max(k - half, 0), points - window)
        at = float(k - start - half)
        slope = powers * np.power(at, np.maximum(powers - 1, 0))  # d/dt of t**p at the point
        matrix[k, start : start + window] = slope @ fit
    matrix.setflags(write=False)
    return matrix


def savgol_derivative(values: np.ndarray, spacing: float, window: int = 21) -> np.ndarray:
    """d(values)/dx on a uniform grid of the given spacing: Savitzky-Golay, cubic, edges fitted (mode 'interp')."""
    values = np.asarray(values, dtype=float)
    return (_savgol_matrix(len(values), _window(len(values), window)) @ values) / spacing


def savgol_derivative_reference(values: np.ndarray, spacing: float, window: int = 21) -> np.ndarray:
    """The same through scipy.signal.savgol_filter, call by call: what ``savgol_derivative`` must equal."""
    from scipy.signal import savgol_filter

    values = np.asarray(values, dtype=float)
    return savgol_filter(values, _window(len(values), window), SAVGOL_ORDER, deriv=1, delta=spacing)
