"""Impedance growth: each fitted resistance against the cell's own baseline and its rate of change.

Fed the resistances of every EIS fit (R_CI, R_ct, ... by name; the twin fits
the cell's circuit after each EIS step). The first spectrum is the baseline.
An element is flagged when it has grown by more than ``growth_ratio`` (30 %)
over its baseline AND is still rising (the last two fits increase), so a
one-off noisy fit does not trip it. A FALLING resistance is never an anomaly:
seed 000's AZO(60) coating converts into a conductive layer and its R_ct
drops over the first cycles, which is the coating working.

The rate reported is ohm per cycle from a straight line through the fits.
Seed 003's ceramic LCO: R_ct 142.6 -> 234.9 ohm from cycle 10 to 50 (+65 %)
trips it by cycle 30; glassy/ceramic (106 ohm, +5 %) never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImpedanceSettings:
    growth_ratio: float = 0.30
    min_resistance_ohm: float = 1.0  # elements smaller than this are below what a fit resolves reliably


@dataclass
class ImpedanceGrowth:
    element: str
    baseline_ohm: float
    resistance_ohm: float
    growth: float
    rate_ohm_per_cycle: float


@dataclass
class ImpedanceGrowthDetector:
    settings: ImpedanceSettings = field(default_factory=ImpedanceSettings)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)

    def add_fit(self, cycle: int, resistances_ohm: dict[str, float]) -> list[ImpedanceGrowth]:
        found = []
        for name, value in resistances_ohm.items():
            series = self.history.setdefault(name, [])
            series.append((cycle, float(value)))
            baseline = series[0][1]
            if name in self.reported or len(series) < 2 or baseline < self.settings.min_resistance_ohm:
                continue
            growth = value / baseline - 1.0
            rising = series[-1][1] > series[-2][1]
            if growth > self.settings.growth_ratio and rising:
                cycles = np.array([c for c, _ in series], dtype=float)
                values = np.array([r for _, r in series])
                rate = float(np.polyfit(cycles, values, 1)[0]) if np.ptp(cycles) > 0 else float("nan")
                self.reported.add(name)
                found.append(ImpedanceGrowth(name, baseline, float(value), float(growth), rate))
        return found
