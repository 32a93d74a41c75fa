"""The twin's residual (measured minus predicted voltage) beyond k sigma.

The model in the loop is never perfect for a real cell, so the residual
has an offset and a noise of its own. Both are learned in a calibration
window at the start of each run (the first ``calibration_samples`` samples
outside step transitions): the median is the baseline, 1.4826 x the median
absolute deviation the sigma (robust to the odd spike), floored at
``sigma_floor_V`` (3 mV: on a steep OCV a 0.1 % charge-count error is that much) so a
noise-free simulation does not make the detector
hair-triggered. Flagged when ``consecutive`` samples in a row sit beyond
``k_sigma`` sigma of the baseline: the cell does something its model does
not (a short, a contact going bad, a sensor failing). The first
``skip_after_step_change`` samples of each step are ignored: a step change
is where the model's sample-and-hold of the current differs most from the
instrument's own control loop. Where the voltage moves fast (the steep end
of a discharge) the allowance widens by ``slope_allowance`` times the
voltage change over the last sample: there a model a few seconds ahead of
or behind the cell is off by tens of millivolts without anything being
wrong with the cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ResidualSettings:
    calibration_samples: int = 100
    k_sigma: float = 6.0
    sigma_floor_V: float = 0.003
    consecutive: int = 5
    skip_after_step_change: int = 3
    slope_allowance: float = 2.0


@dataclass
class ResidualExcursion:
    time_s: float
    onset_time_s: float
    residual_V: float
    baseline_V: float
    sigma_V: float


@dataclass
class ResidualDetector:
    settings: ResidualSettings = field(default_factory=ResidualSettings)
    baseline_V: float | None = None
    sigma_V: float | None = None

    def __post_init__(self) -> None:
        self._calibration: list[float] = []
        self._run: list[float] = []
        self._since_step = 0
        self.reported_in_step = False

    def start_step(self) -> None:
        self._since_step = 0
        self._run = []
        self.reported_in_step = False

    def add(self, time_s: float, residual_V: float, voltage_change_V: float = 0.0) -> ResidualExcursion | None:
        """One sample's residual; ``voltage_change_V`` is the measured change since the previous sample."""
        self._since_step += 1
        if self._since_step <= self.settings.skip_after_step_change or not np.isfinite(residual_V):
            return None
        if self.baseline_V is None:
            self._calibration.append(residual_V)
            if len(self._calibration) >= self.settings.calibration_samples:
                values = np.array(self._calibration)
                self.baseline_V = float(np.median(values))
                mad = float(np.median(np.abs(values - self.baseline_V)))
                self.sigma_V = max(1.4826 * mad, self.settings.sigma_floor_V)
            return None
        assert self.sigma_V is not None
        allowance = self.settings.k_sigma * self.sigma_V + self.settings.slope_allowance * abs(voltage_change_V)
        if abs(residual_V - self.baseline_V) > allowance:
            self._run.append(time_s)
        else:
            self._run = []
        if len(self._run) >= self.settings.consecutive and not self.reported_in_step:
            self.reported_in_step = True
            return ResidualExcursion(time_s, self._run[0], residual_V, self.baseline_V, self.sigma_V)
        return None
