"""Soft shorts: a cell that loses charge at rest, and sudden voltage jumps under steady current (seed 002).

At rest a healthy cell relaxes toward its open-circuit voltage, ever more
slowly. A soft short (a lithium filament, a separator defect) is a
parallel leakage path: the voltage keeps falling at a steady rate. The twin
runs its model in the loop with no leakage, so the residual (measured minus
predicted) of a shorted cell falls steadily at rest while the model's own
relaxation cancels out. The slope of the residual over the second half of a
rest, times the cell's differential capacity dQ/dV, is the leakage current.
Flagged above ``leak_c_rate`` (C/2000: a 1 Ah cell losing more than 0.5 mA,
about 1.2 % of its charge a day) and a total drift of ``min_drift_V``, which must
also be at least ``relaxation_fraction`` (20 %) of the cell's own voltage change over
that half: the model's relaxation cancels the cell's only to within a few per cent
of it. After a 0.2C discharge to 2.0 V a healthy LCO cell relaxes 580 mV in 10
minutes (42 mV over the second half) and a twin a few seconds of charge off the
cell at that steep end drifts 2-3 mV from it meanwhile: with the drift alone every
formation's rests after discharge read as a 5 uA short. A 200 kOhm short (C/57)
moves the residual 5.9 mV over the second half of an hour's rest after charge and
790 mV over a 10-minute rest after discharge, far beyond the relaxation.

Under a steady current a short that forms (or a filament that breaks
through) shows as a jump of the voltage between two samples far beyond
the step's own sample-to-sample changes, AGAINST the direction the current
drives the voltage (a drop while charging, a rise toward zero while
plating or discharging): a short pulls the cell toward its shorted
equilibrium. Moves WITH the drive are the cell filling or emptying (the
steep end of a plateau can fall a volt between two samples) and are left
to the step's end conditions. At rest a jump either way counts. Flagged
when a change exceeds ``jump_V`` (20 mV) and ``jump_sigma`` (8) times the
step's typical change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SoftShortSettings:
    leak_c_rate: float = 1.0 / 2000.0
    min_drift_V: float = 0.002
    min_rest_s: float = 600.0
    relaxation_fraction: float = 0.2
    jump_V: float = 0.02
    jump_sigma: float = 8.0
    current_steady_fraction: float = 0.02


@dataclass
class RestLeak:
    leak_A: float
    residual_slope_V_per_s: float
    drift_V: float


@dataclass
class VoltageJump:
    time_s: float
    jump_V: float
    typical_change_V: float


@dataclass
class SoftShortDetector:
    nominal_capacity_Ah: float
    settings: SoftShortSettings = field(default_factory=SoftShortSettings)

    def __post_init__(self) -> None:
        self.start_step()

    def start_step(self) -> None:
        self._last: tuple[float, float, float] | None = None
        self._changes: list[float] = []

    def rest_leak(
        self,
        time_s: np.ndarray,
        residual_V: np.ndarray,
        dq_dv_Ah_per_V: float,
        voltage_V: np.ndarray | None = None,
    ) -> RestLeak | None:
        """Check one finished (or running) rest: samples of time and twin residual (and the measured voltage,
        whose relaxation over the same half bounds how well the model's relaxation cancels)."""
        t, r = np.asarray(time_s, dtype=float), np.asarray(residual_V, dtype=float)
        # The rest's length counts the interval before its first sample: a 10-minute rest sampled every 30 s
        # has samples from 30 s to 600 s, and measuring it as 570 s kept every 10-minute rest of a formation
        # out of the check (a 200 kOhm short, 790 mV below the model by the end of one, went unflagged).
        if len(t) < 8 or t[-1] - t[0] + float(np.median(np.diff(t))) < self.settings.min_rest_s:
            return None
        half = t >= t[0] + 0.5 * (t[-1] - t[0])
        slope = float(np.polyfit(t[half] - t[half][0], r[half], 1)[0])
        # The drift of the fitted line, not of the half's first and last samples: with 0.2 mV of sensor noise two
        # single samples made a healthy cell's 1.3-1.5 mV relaxation tail read as 2.0-2.3 mV, over the 2 mV floor
        # (cycle-to-80-percent on the ceramic and glassy/ceramic cells: 4 and 14 soft_short alarms).
        drift = float(-slope * (t[half][-1] - t[half][0]))
        leak = -slope * dq_dv_Ah_per_V * 3600.0
        floor = self.settings.min_drift_V
        if voltage_V is not None and len(voltage_V) == len(t):
            relaxation = abs(float(np.asarray(voltage_V, dtype=float)[half][-1] - np.asarray(voltage_V)[half][0]))
            floor = max(floor, self.settings.relaxation_fraction * relaxation)
        if leak > self.settings.leak_c_rate * self.nominal_capacity_Ah and drift > floor:
            return RestLeak(leak, slope, drift)
        return None

    def add(self, time_s: float, voltage_V: float, current_A: float) -> VoltageJump | None:
        """One sample of a constant-current or rest step."""
        if self._last is None:
            self._last = (time_s, voltage_V, current_A)
            return None
        _, v0, i0 = self._last
        self._last = (time_s, voltage_V, current_A)
        steady = abs(current_A - i0) <= self.settings.current_steady_fraction * max(
            abs(i0), 1e-3 * self.nominal_capacity_Ah
        )
        if not steady:
            return None
        change = voltage_V - v0
        typical = float(np.median(np.abs(self._changes[-50:]))) if len(self._changes) >= 10 else None
        self._changes.append(change)
        if typical is None:
            return None
        against_drive = current_A == 0.0 or (change < 0) == (current_A > 0)
        if (
            against_drive
            and abs(change) > self.settings.jump_V
            and abs(change) > self.settings.jump_sigma * max(typical, 1e-5)
        ):
            return VoltageJump(time_s, change, typical)
        return None
