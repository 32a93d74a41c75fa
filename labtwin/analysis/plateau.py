"""Voltage oscillations on a two-phase plateau, measured the way seed 000 does it.

Seed 000 subtracts "the mean line of the plateau" from the galvanostatic curve
and reads the amplitude and the period (in capacity) of what is left. Here the
mean line is a running mean over a window several periods wide (a straight
line leaves the plateau's gentle curvature in the residual), the period is the
strongest Fourier component of the residual, and the amplitude is that of a
sine with the residual's RMS (sqrt(2) x RMS), which noise alone keeps small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlateauOscillation:
    amplitude_V: float
    period_Ah: float
    plateau_voltage_V: float
    plateau_start_Ah: float
    plateau_end_Ah: float
    n_periods: float


def find_plateau(capacity_Ah: np.ndarray, voltage_V: np.ndarray, band_V: float = 0.03, trim: float = 0.1) -> np.ndarray:
    """Indices of the flat part: within band_V of the median voltage, ends trimmed by ``trim`` of its span."""
    median = float(np.median(voltage_V))
    flat = np.abs(voltage_V - median) < band_V
    q = capacity_Ah[flat]
    if len(q) < 10:
        return np.nonzero(flat)[0]
    lo, hi = np.min(q), np.max(q)
    cut_lo, cut_hi = lo + trim * (hi - lo), hi - trim * (hi - lo)
    return np.nonzero(flat & (capacity_Ah >= cut_lo) & (capacity_Ah <= cut_hi))[0]


def plateau_oscillation(
    capacity_Ah: np.ndarray, voltage_V: np.ndarray, window_fraction: float = 0.12, points: int = 4096
) -> PlateauOscillation:
    """Amplitude and period of the oscillation on one galvanostatic half cycle's plateau."""
    idx = find_plateau(np.asarray(capacity_Ah), np.asarray(voltage_V))
    q, v = np.asarray(capacity_Ah)[idx], np.asarray(voltage_V)[idx]
    order = np.argsort(q)
    q, v = q[order], v[order]
    grid = np.linspace(q[0], q[-1], points)
    vg = np.interp(grid, q, v)
    width = max(5, int(window_fraction * points) | 1)
    kernel = np.ones(width) / width
    trend = np.convolve(np.pad(vg, width // 2, mode="reflect"), kernel, mode="valid")
    residual = (vg - trend)[width // 2 : -(width // 2)]
    spacing = grid[1] - grid[0]
    spectrum = np.abs(np.fft.rfft(residual - residual.mean()))
    freqs = np.fft.rfftfreq(len(residual), spacing)
    usable = freqs > 1.0 / (window_fraction * (q[-1] - q[0]))  # periods shorter than the averaging window
    k = int(np.argmax(np.where(usable, spectrum, 0)))
    period = 1.0 / freqs[k] if freqs[k] > 0 else float("nan")
    return PlateauOscillation(
        amplitude_V=float(np.sqrt(2) * residual.std()),
        period_Ah=float(period),
        plateau_voltage_V=float(np.mean(v)),
        plateau_start_Ah=float(q[0]),
        plateau_end_Ah=float(q[-1]),
        n_periods=float((q[-1] - q[0]) / period),
    )
