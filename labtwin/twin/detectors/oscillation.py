"""Online detection of voltage-oscillation onset on a galvanostatic plateau (seed 000).

Fed one sample at a time during a constant-current step. Samples are put on
a uniform capacity grid (the period of a mosaic-instability oscillation is a
charge, not a time: at 0.025C it is shorter in capacity than at 0.1C, and
any time-based window would mix the two). Every ``check_every`` grid points
the last ``window`` of capacity is examined:

1. detrend with a quadratic fitted over the window (keeps the plateau's
   gentle curvature and the early relaxation out of the residual, leaves
   anything that repeats within the window in it);
2. autocorrelation of the residual at lags between ``period_min`` and
   ``period_max``: an oscillation shows a peak there, and, because it is
   periodic, a trough (anti-correlation) at about half that lag. Noise has
   neither; a smooth drift has high correlation at short lags but no trough;
3. amplitude = half the peak-to-peak of the residual folded at the period
   found (the periods averaged: a spiky waveform keeps its height, noise
   averages down).

Onset is declared when the peak correlation is at least ``min_correlation``,
the trough at most ``max_trough`` and the amplitude at least
``min_amplitude_V``: then the onset point reported is the start of the window
that first showed it. Once per step.

Defaults (fractions of the cell's nominal capacity): window 6 %, periods
0.4-3 %. Bare LTO at 0.1C oscillates with a period of about 2.2 % of its
nominal capacity (0.61 uAh/cm2 x 1.89 cm2 of a 52 uAh film), so the window
spans about 2.7 periods: detection comes within three periods of the start.
min_amplitude_V 0.8 mV (half peak-to-peak of the period-folded residual)
sits above AZO(60) (0.2-0.7 mV on its plateau; seed 000 says "none") and
below bare LTO's first spikes (0.9-1.2 mV, growing to 2.5 mV). The model's
AZO(60) cell has a weak sawtooth (correlation about 0.5) in the last ~15 %
of its plateau; a correlation of 0.65 held over three consecutive checks
keeps the detector silent there (18 of 18 noisy half cycles) while bare LTO
is still found 2.4-2.7 periods after its oscillations start (23 of 24; one
noise draw took 5 periods).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class OscillationSettings:
    window_fraction: float = 0.06
    period_min_fraction: float = 0.004
    period_max_fraction: float = 0.03
    grid_points_per_window: int = 240
    check_every: int = 12
    min_amplitude_V: float = 0.8e-3
    min_correlation: float = 0.65
    max_trough: float = -0.4
    max_trend_change_V: float = 0.01
    consecutive: int = 3


@dataclass
class OscillationOnset:
    onset_capacity_Ah: float
    onset_time_s: float
    detected_capacity_Ah: float
    detected_time_s: float
    amplitude_V: float
    period_Ah: float
    correlation: float


@dataclass
class OscillationDetector:
    """One per cell; call ``start_step`` at each galvanostatic step and ``add`` per sample."""

    nominal_capacity_Ah: float
    settings: OscillationSettings = field(default_factory=OscillationSettings)
    found: OscillationOnset | None = None

    def __post_init__(self) -> None:
        s = self.settings
        self.window_Ah = s.window_fraction * self.nominal_capacity_Ah
        self.spacing_Ah = self.window_Ah / s.grid_points_per_window
        self.lag_min = max(2, int(round(s.period_min_fraction * self.nominal_capacity_Ah / self.spacing_Ah)))
        self.lag_max = int(round(s.period_max_fraction * self.nominal_capacity_Ah / self.spacing_Ah))
        self.start_step()

    def start_step(self) -> None:
        self._q0: float | None = None
        self._last_q = 0.0
        self._last_v = 0.0
        self._last_t = 0.0
        self._grid_v: list[float] = []
        self._grid_t: list[float] = []
        self._since_check = 0
        self._passes = 0
        self.found = None

    def add(self, time_s: float, capacity_Ah: float, voltage_V: float) -> OscillationOnset | None:
        """Add one sample of the current step; returns the onset the first time it is seen."""
        if self._q0 is None:
            self._q0 = capacity_Ah
            self._last_q, self._last_v, self._last_t = 0.0, voltage_V, time_s
            self._grid_v.append(voltage_V)
            self._grid_t.append(time_s)
            return None
        q = abs(capacity_Ah - self._q0)
        if q <= self._last_q:
            self._last_v, self._last_t = voltage_V, time_s
            return None
        # Linear interpolation onto the grid points passed since the last sample.
        next_index = len(self._grid_v)
        while next_index * self.spacing_Ah <= q:
            target = next_index * self.spacing_Ah
            frac = (target - self._last_q) / (q - self._last_q)
            self._grid_v.append(self._last_v + frac * (voltage_V - self._last_v))
            self._grid_t.append(self._last_t + frac * (time_s - self._last_t))
            next_index += 1
            self._since_check += 1
        self._last_q, self._last_v, self._last_t = q, voltage_V, time_s
        if self.found is not None or self._since_check < self.settings.check_every:
            return None
        self._since_check = 0
        return self._check()

    def evaluate(self) -> dict[str, float] | None:
        """The figures of the last window (None until a window is full): for tests and the twin's state."""
        n = self.settings.grid_points_per_window
        if len(self._grid_v) < n:
            return None
        v = np.asarray(self._grid_v[-n:])
        x = np.linspace(-1.0, 1.0, n)
        trend = np.polyval(np.polyfit(x, v, 2), x)
        residual = v - trend
        # A short running mean (a tenth of the shortest period) takes white sensor noise out before
        # correlating; it leaves any waveform slower than that intact.
        width = max(1, self.lag_min // 2) | 1
        if width > 1:
            residual = np.convolve(np.pad(residual, width // 2, mode="edge"), np.ones(width) / width, mode="valid")
        r = residual - residual.mean()
        power = float(r @ r)
        lag_max = min(self.lag_max, n // 2)
        if power <= 0 or lag_max < self.lag_min:
            return None
        # Pearson's correlation of the window with itself shifted by each lag: bounded by 1 whatever the lag
        # (the power-normalised sum scaled by n/(n-k) reached 1.06 on a real LTO plateau).
        corr = np.empty(lag_max)
        for k in range(1, lag_max + 1):
            a, b = r[:-k], r[k:]
            norm = float(np.sqrt((a @ a) * (b @ b)))
            corr[k - 1] = float(a @ b) / norm if norm > 0 else 0.0
        k_peak = int(np.argmax(corr[self.lag_min - 1 :])) + self.lag_min
        # Fold the residual at the period found: averaging the periods keeps the waveform (spiky or not)
        # and averages the noise down, so the amplitude is the waveform's half peak-to-peak.
        n_periods = n // k_peak
        folded = r[n - n_periods * k_peak :].reshape(n_periods, k_peak).mean(axis=0)
        return {
            "amplitude_V": float(0.5 * (folded.max() - folded.min())),
            "period_Ah": k_peak * self.spacing_Ah,
            "correlation": float(corr[k_peak - 1]),
            "trough": float(corr[:k_peak].min()),
            "trend_change_V": float(trend.max() - trend.min()),
        }

    def _check(self) -> OscillationOnset | None:
        figures = self.evaluate()
        s = self.settings
        if (
            figures is None
            or figures["amplitude_V"] < s.min_amplitude_V
            or figures["correlation"] < s.min_correlation
            or figures["trough"] > s.max_trough
            or figures["trend_change_V"] > s.max_trend_change_V
        ):
            self._passes = 0
            return None
        self._passes += 1
        if self._passes < s.consecutive:  # a pattern that holds over two checks, not one lucky window
            return None
        start = len(self._grid_v) - s.grid_points_per_window - (s.consecutive - 1) * s.check_every
        self.found = OscillationOnset(
            onset_capacity_Ah=start * self.spacing_Ah,
            onset_time_s=self._grid_t[start],
            detected_capacity_Ah=(len(self._grid_v) - 1) * self.spacing_Ah,
            detected_time_s=self._grid_t[-1],
            amplitude_V=figures["amplitude_V"],
            period_Ah=figures["period_Ah"],
            correlation=figures["correlation"],
        )
        return self.found
