"""Per-cycle detectors: capacity fade and its knee, Coulombic efficiency, polarization growth.

Each is fed one finished cycle at a time, a CycleSummary made by
labtwin.analysis.cycles from the agent's step statistics of the steps that
carry that cycle number (the run summary's figures, CE by its half-cell
convention), and returns the anomalies that cycle completes. Thresholds are parameters; defaults and why:

- capacity fade: retention below 80 % of the first full cycle, the usual
  end-of-life line (PyBaMM's "80% capacity" experiment stop, seed 003's
  retention figures).
- knee onset: the fade rate over the last ``knee_window`` (10) cycles exceeds
  ``knee_ratio`` (3x) the rate over the cycles before, by more than three
  standard errors of that recent slope, once 2 x window cycles exist: a
  linear fade never trips it, nor does end-of-step sampling jitter (about
  1 % of capacity per cycle at 120 s samples), an accelerating fade does.
- low first-cycle CE: below 80 % (seed 004: pristine LCO 21.9 %, coated 89-90 %).
- CE change: from cycle 3 on, a cycle whose CE differs from the median of
  the previous five by more than 2 points (end-of-step sampling moves a
  healthy cell's CE by well under 1 point). Only cycles that moved at least
  ``ce_min_charge_fraction`` (10 %) of the cell's nominal capacity (of the
  largest cycle so far where no nominal is known) are compared or compared
  with: the CE of a cycle that moved a few per cent of the cell's capacity is
  two small numbers, each set by where its step's end fell between samples
  (seed 003's bare LCO, its interface past 2 kOhm after one charge, cycles 1.5-5 %
  of its 1.02 mAh at 120 s sampling and its CE scatters 92-108 %: 39 ce_change
  alarms in 50 cycles of a cell whose fade was already flagged).
- polarization growth: mean charge voltage minus mean discharge voltage
  (energy/charge of each direction) above the first three cycles' median by
  more than 50 % AND 20 mV (seed 003's bare LCO polarization rises from 0.75 V
  toward 1.33 V; glassy/ceramic stays flat).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from labtwin.analysis.cycles import CycleSummary


@dataclass
class CyclingSettings:
    capacity_retention_min: float = 0.80
    knee_window: int = 10
    knee_ratio: float = 3.0
    knee_floor_per_cycle: float = 1e-3  # fade slower than 0.1 %/cycle counts as this much: noise never makes a knee
    first_cycle_ce_min: float = 0.80
    ce_jump: float = 0.02
    ce_min_charge_fraction: float = 0.1
    polarization_growth_ratio: float = 0.5
    polarization_growth_min_V: float = 0.02


@dataclass
class Finding:
    kind: str
    message: str
    figures: dict[str, float]


@dataclass
class CyclingDetector:
    settings: CyclingSettings = field(default_factory=CyclingSettings)
    nominal_capacity_Ah: float | None = None
    cycles: list[CycleSummary] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)

    def add_cycle(self, c: CycleSummary) -> list[Finding]:
        self.cycles.append(c)
        s, out = self.settings, []
        ce = c.coulombic_efficiency
        if len(self.cycles) == 1 and ce is not None and ce < s.first_cycle_ce_min:
            out.append(
                Finding(
                    "low_first_cycle_ce",
                    f"first-cycle Coulombic efficiency {ce:.1%} is below {s.first_cycle_ce_min:.0%}",
                    {"coulombic_efficiency": ce, "threshold": s.first_cycle_ce_min},
                )
            )
        largest = max(max(x.charge_Ah, x.discharge_Ah) for x in self.cycles)
        reference_Ah = max(largest, self.nominal_capacity_Ah or 0.0)

        def comparable(x: CycleSummary) -> bool:
            return x.coulombic_efficiency is not None and max(x.charge_Ah, x.discharge_Ah) >= (
                s.ce_min_charge_fraction * reference_Ah
            )

        history = [
            x.coulombic_efficiency for x in self.cycles[1:-1] if x.coulombic_efficiency is not None and comparable(x)
        ][-5:]
        if len(self.cycles) >= 3 and ce is not None and comparable(c) and len(history) >= 2:
            median = float(np.median(history))
            if abs(ce - median) > s.ce_jump:
                out.append(
                    Finding(
                        "ce_change",
                        f"cycle {c.cycle}: Coulombic efficiency {ce:.2%} vs {median:.2%} before",
                        {"coulombic_efficiency": ce, "previous_median": median, "change": ce - median},
                    )
                )
        delivered = np.array([x.delivered_Ah for x in self.cycles])
        first = delivered[0] if len(delivered) and delivered[0] > 0 else None
        if first is not None and "capacity_fade" not in self.reported:
            retention = float(delivered[-1] / first)
            if retention < s.capacity_retention_min:
                self.reported.add("capacity_fade")
                out.append(
                    Finding(
                        "capacity_fade",
                        f"capacity {retention:.1%} of cycle 1 (threshold {s.capacity_retention_min:.0%})",
                        {
                            "retention": retention,
                            "capacity_Ah": float(delivered[-1]),
                            "first_capacity_Ah": float(first),
                        },
                    )
                )
        w = s.knee_window
        if first is not None and len(delivered) >= 2 * w and "knee_onset" not in self.reported:
            x_recent = np.arange(w, dtype=float)
            (recent, offset), residuals_recent = np.polyfit(x_recent, delivered[-w:] / first, 1), None
            residuals_recent = delivered[-w:] / first - (recent * x_recent + offset)
            # Standard error of the recent slope: a noisy capacity (end-of-step sampling moves it by
            # ~1 %) must not read as a knee.
            slope_se = float(np.sqrt(np.sum(residuals_recent**2) / (w - 2) / np.sum((x_recent - x_recent.mean()) ** 2)))
            before = np.polyfit(np.arange(len(delivered) - w), delivered[:-w] / first, 1)[0]
            threshold = s.knee_ratio * min(before, -s.knee_floor_per_cycle)
            if recent < 0 and recent < threshold and recent < before - 3.0 * slope_se:
                self.reported.add("knee_onset")
                out.append(
                    Finding(
                        "knee_onset",
                        f"fade accelerated: {-recent:.2%}/cycle over the last {w} cycles vs {-before:.2%}/cycle before",
                        {
                            "recent_fade_per_cycle": float(-recent),
                            "earlier_fade_per_cycle": float(-before),
                            "recent_slope_standard_error": slope_se,
                        },
                    )
                )
        pol = [x.mean_polarization_V for x in self.cycles]
        if len(pol) >= 4 and pol[-1] is not None and "polarization_growth" not in self.reported:
            base_values = [p for p in pol[:3] if p is not None]
            if base_values:
                base = float(np.median(base_values))
                rise = pol[-1] - base
                if rise > s.polarization_growth_min_V and rise > s.polarization_growth_ratio * base:
                    self.reported.add("polarization_growth")
                    out.append(
                        Finding(
                            "polarization_growth",
                            f"polarization {pol[-1]:.3f} V vs {base:.3f} V in the first cycles",
                            {"polarization_V": float(pol[-1]), "baseline_V": base},
                        )
                    )
        return out
