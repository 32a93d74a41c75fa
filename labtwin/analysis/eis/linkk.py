"""Lin-KK: is a spectrum Kramers-Kronig consistent (linear, causal, stable, time-invariant)?

Schoenleber, Klotz and Ivers-Tiffee (Electrochim. Acta 131, 2014): fit the
spectrum with M RC elements whose time constants are fixed and log-spaced
between 1/omega_max and 1/omega_min. The model is KK-consistent by
construction and linear in its resistances, so the fit is one linear least
squares solve. Over-fitting shows as resistances of alternating sign, which
mu = 1 - sum|R_k<0| / sum|R_k>=0| measures; the paper accepts M while mu
stays above c (0.85).

One deviation, and why: the paper stops at the FIRST M whose mu falls below
c. On sharp spectra (an ideal RC, e.g. the dummy circuits in
tests/data/eis) mu is not monotonic in M: it dips to 0.67 at M = 4, where
the residuals are still 25 %, and climbs back above 0.9 at M = 14 with
residuals at the 0.1 % noise floor. The first-dip rule would call a passive
circuit KK-invalid. Here every M up to ``max_elements`` is solved (each is one
small linear solve) and the M with the smallest residual among those with
mu >= c is kept. Residuals relative to |Z| then show whether the data obey
KK: a drifting cell (e.g. a battery still relaxing after a charge) leaves
systematic residuals at low frequency well above the noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinKK:
    n_elements: int
    mu: float
    time_constants_s: np.ndarray
    resistances_ohm: np.ndarray
    series_resistance_ohm: float
    inductance_H: float
    inverse_capacitance_per_F: float
    residual_real: np.ndarray
    residual_imag: np.ndarray
    impedance_fit_ohm: np.ndarray

    @property
    def max_residual(self) -> float:
        return float(max(np.max(np.abs(self.residual_real)), np.max(np.abs(self.residual_imag))))

    @property
    def rms_residual(self) -> float:
        return float(np.sqrt(np.mean(self.residual_real**2 + self.residual_imag**2) / 2.0))

    def valid(self, tolerance: float = 0.01) -> bool:
        """True when every point lies within ``tolerance`` (relative to |Z|) of the KK-consistent fit."""
        return self.max_residual <= tolerance


def _design(omega: np.ndarray, tau: np.ndarray, capacitance: bool) -> np.ndarray:
    """Columns: R_series, R_k (k = 1..M), L, and optionally 1/C; complex."""
    rc = 1.0 / (1.0 + 1j * omega[:, None] * tau[None, :])
    cols = [np.ones_like(omega, dtype=complex)[:, None], rc, (1j * omega)[:, None]]
    if capacitance:
        cols.append((1.0 / (1j * omega))[:, None])
    return np.hstack(cols)


def lin_kk(frequency_Hz, impedance_ohm, c: float = 0.85, max_elements: int = 50, capacitance: bool = False) -> LinKK:
    """Run Lin-KK; ``capacitance`` adds a series capacitor (for blocking electrodes whose -Z'' diverges)."""
    f = np.asarray(frequency_Hz, dtype=float)
    z = np.asarray(impedance_ohm, dtype=complex)
    if f.shape != z.shape or f.ndim != 1 or len(f) < 4:
        raise ValueError("lin_kk needs 1-D frequency_Hz and impedance_ohm of equal length, at least 4 points")
    omega = 2.0 * np.pi * f
    weight = 1.0 / np.abs(z)
    target = np.concatenate([(z * weight).real, (z * weight).imag])
    candidates = []
    for m in range(1, min(max_elements, len(f)) + 1):
        if m == 1:
            tau = np.array([1.0 / np.sqrt(omega.min() * omega.max())])
        else:
            tau = np.logspace(np.log10(1.0 / omega.max()), np.log10(1.0 / omega.min()), m)
        a = _design(omega, tau, capacitance) * weight[:, None]
        coef, *_ = np.linalg.lstsq(np.vstack([a.real, a.imag]), target, rcond=None)
        r_k = coef[1 : 1 + m]
        positive = np.sum(np.abs(r_k[r_k >= 0]))
        mu = 1.0 - np.sum(np.abs(r_k[r_k < 0])) / positive if positive > 0 else 0.0
        chi2 = float(np.sum((np.vstack([a.real, a.imag]) @ coef - target) ** 2))
        candidates.append((m, mu, tau, coef, chi2))
    accepted = [c_ for c_ in candidates if c_[1] >= c] or candidates[:1]
    m, mu, tau, coef, _ = min(accepted, key=lambda c_: c_[4])
    z_fit = _design(omega, tau, capacitance) @ coef
    residual = (z - z_fit) / np.abs(z)
    return LinKK(
        n_elements=m,
        mu=float(mu),
        time_constants_s=tau,
        resistances_ohm=coef[1 : 1 + m].copy(),
        series_resistance_ohm=float(coef[0]),
        inductance_H=float(coef[1 + m]),
        inverse_capacitance_per_F=float(coef[2 + m]) if capacitance else 0.0,
        residual_real=residual.real,
        residual_imag=residual.imag,
        impedance_fit_ohm=z_fit,
    )
