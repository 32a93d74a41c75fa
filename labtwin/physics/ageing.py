"""Ageing laws: how resistances, exchange currents and capacity change with use.

Counted in equivalent full cycles (throughput / (2 x nominal capacity)), the
unit cycling papers report against, or in hours for calendar effects.

- ``sqrt``: SEI-like growth, R = R0 (1 + rate sqrt(n)): diffusion-limited film
  growth thickens with the square root of time or throughput.
- ``linear``: R = R0 (1 + rate n).
- ``converts``: a coating that turns into a conductive layer, R falls from R0
  to final_factor R0 with a characteristic number of cycles (seed 000 AZO(60):
  R_ct FALLS over the first cycles).
Capacity fade: loss of active material toward a plateau (seed 000 bare LTO
27.4 -> 17.8 uAh/cm2 over 100 cycles, then holding), a linear loss of lithium
inventory, and an optional knee after which the loss accelerates.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ResistanceAgeing(BaseModel):
    model_config = ConfigDict(extra="forbid")

    law: Literal["sqrt", "linear", "converts"]
    rate: float = Field(0.0, ge=0, description="sqrt/linear: relative growth per sqrt(cycle) or per cycle")
    final_factor: float = Field(1.0, gt=0, description="converts: R_final / R_initial")
    cycles: float = Field(1.0, gt=0, description="converts: characteristic number of cycles")
    counted_in: Literal["cycles", "hours"] = "cycles"

    def factor(self, cycles: float, hours: float) -> float:
        n = cycles if self.counted_in == "cycles" else hours
        n = max(n, 0.0)
        if self.law == "sqrt":
            return 1.0 + self.rate * math.sqrt(n)
        if self.law == "linear":
            return 1.0 + self.rate * n
        return self.final_factor + (1.0 - self.final_factor) * math.exp(-n / self.cycles)


class CapacityFade(BaseModel):
    model_config = ConfigDict(extra="forbid")

    plateau_fraction: float = Field(1.0, gt=0, le=1, description="share of capacity left when the early fade ends")
    fade_cycles: float = Field(1.0, gt=0, description="characteristic cycles of the early fade")
    linear_per_cycle: float = Field(0.0, ge=0, description="further loss per cycle (lithium inventory)")
    knee_cycle: float | None = Field(None, gt=0, description="after this cycle the loss accelerates")
    knee_per_cycle2: float = Field(0.0, ge=0, description="extra loss per cycle squared after the knee")

    def remaining(self, cycles: float) -> float:
        n = max(cycles, 0.0)
        early = self.plateau_fraction + (1.0 - self.plateau_fraction) * math.exp(-n / self.fade_cycles)
        loss = self.linear_per_cycle * n
        if self.knee_cycle is not None and n > self.knee_cycle:
            loss += self.knee_per_cycle2 * (n - self.knee_cycle) ** 2
        return max(early - loss, 0.02)
