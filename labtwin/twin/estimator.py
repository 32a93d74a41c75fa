"""Resistances from live data: recursive least squares on a one-RC equivalent circuit.

Why RLS and not a Kalman filter: the twin already runs a physics model in
the loop that carries the state (state of charge, concentrations), so what
is left to estimate online are slowly drifting parameters (series
resistance, one polarization RC). RLS with a forgetting factor does exactly
that in O(n^2) for n = 3 unknowns per sample, has no process-noise
covariance to tune (an EKF's Q and R are guesses that decide its answer),
and its estimate is the plain least-squares fit of the recent data, which a
battery engineer can check by hand. Plett (J. Power Sources 134, 2004) uses
the same ARX form for cell parameter identification.

Model (sample interval dt, y = V - OCV, OCV from the twin's model):
    y_k = a y_(k-1) + b0 I_k + b1 I_(k-1)
    R0 = b0,  a = exp(-dt / tau),  R1 = (b1 + a b0) / (1 - a)
Forgetting is applied only when the current changes (there is something to
learn); during hours of constant current the estimate holds still instead of
drifting with the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RcEstimate:
    series_resistance_ohm: float
    rc_resistance_ohm: float | None
    rc_time_constant_s: float | None


@dataclass
class RecursiveRcEstimator:
    forgetting: float = 0.995
    min_current_change_A: float = 1e-9
    theta: np.ndarray = field(default_factory=lambda: np.array([0.9, 0.0, 0.0]))
    covariance: np.ndarray = field(default_factory=lambda: np.eye(3) * 1e6)
    updates: int = 0

    def __post_init__(self) -> None:
        self._previous: tuple[float, float] | None = None
        self._dt_s: float | None = None

    def reset_continuity(self) -> None:
        """A gap (EIS step, a new run): the next sample has no predecessor to regress on."""
        self._previous = None

    def add(self, dt_s: float, y_V: float, current_A: float) -> None:
        if self._previous is None or dt_s <= 0 or not (math.isfinite(y_V) and math.isfinite(current_A)):
            self._previous = (y_V, current_A)
            return
        y_prev, i_prev = self._previous
        self._previous = (y_V, current_A)
        self._dt_s = dt_s
        phi = np.array([y_prev, current_A, i_prev])
        excited = abs(current_A - i_prev) > self.min_current_change_A
        lam = self.forgetting if excited else 1.0
        p_phi = self.covariance @ phi
        gain = p_phi / (lam + phi @ p_phi)
        self.theta = self.theta + gain * (y_V - phi @ self.theta)
        self.covariance = (self.covariance - np.outer(gain, p_phi)) / lam
        self.updates += 1

    def estimate(self) -> RcEstimate | None:
        if self.updates < 10:
            return None
        a, b0, b1 = (float(v) for v in self.theta)
        r1 = tau = None
        if 0.0 < a < 1.0 and self._dt_s:
            tau = -self._dt_s / math.log(a)
            r1 = (b1 + a * b0) / (1.0 - a)
        return RcEstimate(b0, r1, tau)
