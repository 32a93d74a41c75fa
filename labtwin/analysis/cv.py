"""Cyclic voltammetry: peaks, peak separation, and a Randles-Sevcik diffusion coefficient from several scan rates.

Seed 001's method: CVs at several scan rates; the peak separation shows how
reversible the reaction is (59 mV/n for a Nernstian couple, rising with rate
as kinetics lag), and the peak current against the square root of the scan
rate is a straight line while transport is diffusion-limited:

    i_p = 0.4463 n F A C sqrt(n F v D / (R T))

so D = (slope / (0.4463 n F A C))^2 R T / (n F). A C is the amount of
electroactive species per volume times the area: for a thin film of
thickness L holding charge Q it is Q / (F L) (``area_concentration_mol_per_m``).

At high rates i_p bends below the line (kinetics, iR), so the fit uses the
longest run of the slowest rates whose line keeps R^2 >= ``min_r2`` and
reports that linear range; fitting all rates blindly would bias D low.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import find_peaks

FARADAY_C_PER_MOL = 96485.33212
GAS_CONSTANT_J_PER_MOL_K = 8.314462618


@dataclass
class Peak:
    potential_V: float
    current_A: float
    direction: str  # "anodic" (current > 0, the sweep going up) or "cathodic"
    prominence_A: float


@dataclass
class Voltammogram:
    scan_rate_V_s: float
    peaks: list[Peak]
    anodic: Peak | None
    cathodic: Peak | None

    @property
    def peak_separation_V(self) -> float | None:
        if self.anodic is None or self.cathodic is None:
            return None
        return self.anodic.potential_V - self.cathodic.potential_V


def scan_rate_V_s(time_s: np.ndarray, voltage_V: np.ndarray) -> float:
    """The sweep rate: median |dE/dt| over the points where the potential moves."""
    dv, dt = np.diff(voltage_V), np.diff(time_s)
    rates = np.abs(dv[dt > 0] / dt[dt > 0])
    moving = rates[rates > 0.1 * np.max(rates)] if len(rates) else rates
    return float(np.median(moving)) if len(moving) else float("nan")


def voltammogram(
    voltage_V, current_A, time_s=None, scan_rate=None, min_prominence_fraction: float = 0.05
) -> Voltammogram:
    """Peaks of one CV: every local maximum of the anodic branch and minimum of the cathodic one.

    Several peaks per direction are kept (LFP's metastable double peak, LCO's
    three redox pairs); the largest of each direction is the main pair.
    """
    v = np.asarray(voltage_V, dtype=float)
    i = np.asarray(current_A, dtype=float)
    if len(v) < 5:
        raise ValueError("a voltammogram needs at least 5 points")
    rate = (
        scan_rate
        if scan_rate is not None
        else (scan_rate_V_s(np.asarray(time_s), v) if time_s is not None else float("nan"))
    )
    prominence = min_prominence_fraction * float(np.max(np.abs(i)))
    peaks: list[Peak] = []
    up = np.gradient(v) > 0
    for sign, direction, branch in ((1.0, "anodic", up), (-1.0, "cathodic", ~up)):
        masked = np.where(branch, sign * i, -np.inf)
        masked = np.where(np.isfinite(masked), masked, np.min(sign * i) - 1.0)
        idx, props = find_peaks(masked, prominence=prominence)
        for k, prom in zip(idx, props["prominences"]):
            if sign * i[k] > 0:
                peaks.append(Peak(float(v[k]), float(i[k]), direction, float(prom)))
    anodic = max((p for p in peaks if p.direction == "anodic"), key=lambda p: p.current_A, default=None)
    cathodic = min((p for p in peaks if p.direction == "cathodic"), key=lambda p: p.current_A, default=None)
    return Voltammogram(rate, sorted(peaks, key=lambda p: p.potential_V), anodic, cathodic)


@dataclass
class RandlesSevcik:
    diffusivity_m2_s: float
    slope_A_per_sqrt_V_s: float
    intercept_A: float
    r_squared: float
    linear_range_V_s: tuple[float, float]
    rates_used: int


def randles_sevcik(
    scan_rates_V_s,
    peak_currents_A,
    area_concentration_mol_per_m: float,
    electrons: int = 1,
    temperature_C: float = 25.0,
    min_r2: float = 0.99,
) -> RandlesSevcik:
    """D from peak current against sqrt(scan rate), over the longest linear run of the slowest rates."""
    rates = np.asarray(scan_rates_V_s, dtype=float)
    peaks = np.abs(np.asarray(peak_currents_A, dtype=float))
    if len(rates) < 3 or len(rates) != len(peaks):
        raise ValueError("Randles-Sevcik needs the peak current of at least 3 scan rates")
    order = np.argsort(rates)
    rates, peaks = rates[order], peaks[order]
    x = np.sqrt(rates)
    best: tuple[int, float, float, float] | None = None
    for n in range(3, len(rates) + 1):
        slope, intercept = np.polyfit(x[:n], peaks[:n], 1)
        fitted = slope * x[:n] + intercept
        ss_res = float(np.sum((peaks[:n] - fitted) ** 2))
        ss_tot = float(np.sum((peaks[:n] - peaks[:n].mean()) ** 2))
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
        if best is None or r2 >= min_r2:
            best = (n, float(slope), float(intercept), r2)
        if r2 < min_r2:
            break
    assert best is not None  # the first run (n = 3) always sets it
    n, slope, intercept, r2 = best
    kelvin = temperature_C + 273.15
    factor = 0.4463 * electrons * FARADAY_C_PER_MOL * area_concentration_mol_per_m
    diffusivity = (slope / factor) ** 2 * GAS_CONSTANT_J_PER_MOL_K * kelvin / (electrons * FARADAY_C_PER_MOL)
    return RandlesSevcik(diffusivity, slope, intercept, r2, (float(rates[0]), float(rates[n - 1])), n)
