"""Distribution of relaxation times (DRT): the spectrum as a continuum of RC elements, without choosing a circuit.

    Z(f) = R_inf + i 2 pi f L + sum_k g_k / (1 + i 2 pi f tau_k)

on a logarithmic grid of tau (one decade beyond the measured frequencies on each side), with g >= 0 (a passive
cell's relaxations add resistance). The problem is ill-posed, so the fit is Tikhonov-regularised: minimise
|A g - Z|^2 + lambda |D g|^2 with D the second difference over the grid (smooth peaks, not spikes), solved as
non-negative least squares on the stacked system. lambda is chosen from the data by generalised
cross-validation (GCV) of the unconstrained problem over a log grid of candidates, as pyDRTtools does among its
options: the lambda whose fit best predicts each point from the others. Peaks of g are the processes: a peak at
tau is an arc with apex frequency 1 / (2 pi tau), its area the arc's resistance. The circuit fit and the DRT
are two readings of one spectrum; where both see an arc, their time constants should agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POINTS_PER_DECADE = 10
EXTRA_DECADES = 1.0
LAMBDA_CANDIDATES = np.logspace(-10, 1, 45)
MIN_POINTS = 8


@dataclass
class DrtPeak:
    tau_s: float
    frequency_Hz: float  # the arc's apex, 1 / (2 pi tau)
    resistance_ohm: float  # the area under the peak


@dataclass
class Drt:
    tau_s: np.ndarray
    gamma_ohm: np.ndarray  # resistance per grid point (the distribution times the log spacing)
    r_inf_ohm: float
    inductance_H: float
    regularisation: float
    relative_rms: float
    peaks: list[DrtPeak]

    def impedance_ohm(self, frequency_Hz) -> np.ndarray:
        omega = 2 * np.pi * np.asarray(frequency_Hz, dtype=float)
        z = self.r_inf_ohm + 1j * omega * self.inductance_H
        return z + (self.gamma_ohm[None, :] / (1 + 1j * omega[:, None] * self.tau_s[None, :])).sum(axis=1)


def _design(frequency_Hz: np.ndarray, tau_s: np.ndarray) -> np.ndarray:
    """Real rows then imaginary rows; columns: the RC elements, then R_inf, then L."""
    omega = 2 * np.pi * frequency_Hz
    kernel = 1.0 / (1 + 1j * omega[:, None] * tau_s[None, :])
    n = len(frequency_Hz)
    a = np.zeros((2 * n, len(tau_s) + 2))
    a[:n, : len(tau_s)], a[n:, : len(tau_s)] = kernel.real, kernel.imag
    a[:n, len(tau_s)] = 1.0  # R_inf
    a[n:, len(tau_s) + 1] = omega  # L (imaginary part only)
    return a


def _second_difference(size: int, elements: int) -> np.ndarray:
    d = np.zeros((max(elements - 2, 0), size))
    for k in range(elements - 2):
        d[k, k : k + 3] = (1.0, -2.0, 1.0)
    return d


def _gcv_lambda(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> float:
    """GCV over the candidates for the unconstrained ridge problem (the constrained one has no closed form)."""
    best, best_score = float(LAMBDA_CANDIDATES[0]), np.inf
    m = a.shape[0]
    ata, atb, dtd = a.T @ a, a.T @ b, d.T @ d
    for lam in LAMBDA_CANDIDATES:
        try:
            inverse = np.linalg.solve(ata + lam * dtd + 1e-12 * np.eye(len(ata)), np.eye(len(ata)))
        except np.linalg.LinAlgError:
            continue
        x = inverse @ atb
        trace_influence = float(np.trace(a @ inverse @ a.T))
        residual = float(np.sum((a @ x - b) ** 2))
        score = m * residual / max(m - trace_influence, 1e-9) ** 2
        if score < best_score:
            best, best_score = float(lam), score
    return best


def _peaks(tau_s: np.ndarray, gamma: np.ndarray, f_min_Hz: float, f_max_Hz: float) -> list[DrtPeak]:
    """Local maxima above 2 % of the largest, each with the resistance of its basin (between the minima), whose
    apex lies within the measured frequencies: a peak beyond them is the grid's extension absorbing what the
    data cannot place (the series resistance at the high end), not a process the spectrum shows."""
    if not np.any(gamma > 0):
        return []
    threshold = 0.02 * float(gamma.max())
    padded = np.concatenate([[0.0], gamma, [0.0]])
    maxima = [k for k in range(len(gamma)) if padded[k + 1] > padded[k] and padded[k + 1] >= padded[k + 2]]
    maxima = [k for k in maxima if gamma[k] > threshold]
    out = []
    for j, k in enumerate(maxima):
        lo = 0 if j == 0 else int(np.argmin(gamma[maxima[j - 1] : k + 1])) + maxima[j - 1]
        hi = len(gamma) if j == len(maxima) - 1 else int(np.argmin(gamma[k : maxima[j + 1] + 1])) + k + 1
        apex_Hz = float(1 / (2 * np.pi * tau_s[k]))
        if f_min_Hz <= apex_Hz <= f_max_Hz:
            out.append(DrtPeak(float(tau_s[k]), apex_Hz, float(gamma[lo:hi].sum())))
    return out


def fit_drt(frequency_Hz, impedance_ohm, regularisation: float | None = None) -> Drt:
    """The DRT of one spectrum; ``regularisation`` fixes lambda instead of choosing it by GCV."""
    from scipy.optimize import nnls

    f = np.asarray(frequency_Hz, dtype=float)
    z = np.asarray(impedance_ohm, dtype=complex)
    good = np.isfinite(f) & np.isfinite(z) & (f > 0)
    f, z = f[good], z[good]
    if len(f) < MIN_POINTS:
        raise ValueError(f"a DRT needs at least {MIN_POINTS} finite points with frequency > 0 (got {len(f)})")
    lo = np.log10(1 / (2 * np.pi * f.max())) - EXTRA_DECADES
    hi = np.log10(1 / (2 * np.pi * f.min())) + EXTRA_DECADES
    tau = np.logspace(lo, hi, int(round((hi - lo) * POINTS_PER_DECADE)) + 1)
    # Scaled by |Z| so every decade weighs alike (the high-frequency points are small).
    weight = 1.0 / np.abs(z)
    a = _design(f, tau) * np.concatenate([weight, weight])[:, None]
    b = np.concatenate([z.real, z.imag]) * np.concatenate([weight, weight])
    d = _second_difference(a.shape[1], len(tau))
    lam = _gcv_lambda(a, b, d) if regularisation is None else float(regularisation)
    # NNLS on the stacked system keeps g, R_inf >= 0; L may take either sign: split into L+ - L-.
    stacked = np.vstack([np.column_stack([a, -a[:, -1]]), np.sqrt(lam) * np.column_stack([d, np.zeros(len(d))])])
    x, _ = nnls(stacked, np.concatenate([b, np.zeros(len(d))]), maxiter=50 * stacked.shape[1])
    gamma, r_inf, inductance = x[: len(tau)], float(x[len(tau)]), float(x[len(tau) + 1] - x[len(tau) + 2])
    drt = Drt(tau, gamma, r_inf, inductance, lam, 0.0, _peaks(tau, gamma, float(f.min()), float(f.max())))
    drt.relative_rms = float(np.sqrt(np.mean(np.abs(drt.impedance_ohm(f) - z) ** 2 / np.abs(z) ** 2)))
    return drt
