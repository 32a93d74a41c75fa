"""Open-circuit potentials of electrode materials, as functions of the lithium fraction x (0..1).

x is the filling of the host (Li4Ti5O12 -> Li7Ti5O12 is x 0 -> 1; Li_xCoO2 is x
itself), so every curve FALLS as x rises: lithiating a host lowers its
potential vs Li/Li+. Each model gives the potential and its slope dU/dx (the
slope is what makes a phase-separating material unstable and what the
impedance linearisation needs).

- ``regular_solution``: two-phase materials (LTO 1.55 V, LFP 3.42 V). With the
  interaction energy Omega and mu(x) = Omega (1 - 2x) + kT ln(x / (1 - x)),
  U = U_eq - mu / e. For Omega > 2 kT, U(x) is non-monotonic: a single grain
  overshoots the two-phase voltage and the spinodal region (dU/dx > 0) is
  unstable. Omega = 0 is an ideal solid solution (a Nernstian couple).
- ``tanh_series``: analytic fits such as Doyle's LiCoO2 curve (Dualfoil).
- ``tabulated``: measured curves (graphite, anything else).
- ``constant``: lithium metal (0 V) or Li-In (0.62 V) counter electrodes.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

X_MIN = 1e-9


class _Ocp(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegularSolutionOcp(_Ocp):
    kind: Literal["regular_solution"] = "regular_solution"
    equilibrium_V: float = Field(description="two-phase coexistence potential vs Li/Li+")
    interaction_eV: float = Field(
        ge=0, description="regular-solution Omega per site; > 2 kT (0.0514 eV at 25 C) phase-separates"
    )

    def voltage_V(self, x, thermal_V: float):
        x = np.clip(x, X_MIN, 1 - X_MIN)
        return self.equilibrium_V - (self.interaction_eV * (1 - 2 * x) + thermal_V * np.log(x / (1 - x)))

    def slope_V(self, x, thermal_V: float):
        x = np.clip(x, X_MIN, 1 - X_MIN)
        return 2 * self.interaction_eV - thermal_V / (x * (1 - x))


class TanhSeriesOcp(_Ocp):
    """U = offset + sum(amplitude * tanh(shift + slope * stretch * x))."""

    kind: Literal["tanh_series"] = "tanh_series"
    offset_V: float
    stretch: float = 1.0
    terms: list[tuple[float, float, float]] = Field(min_length=1, description="(amplitude_V, shift, slope) per term")

    def voltage_V(self, x, thermal_V: float = 0.0):
        s = self.stretch * np.asarray(x, dtype=float)
        total = np.full_like(s, self.offset_V)
        for amp, shift, slope in self.terms:
            total = total + amp * np.tanh(shift + slope * s)
        return total

    def slope_V(self, x, thermal_V: float = 0.0):
        s = self.stretch * np.asarray(x, dtype=float)
        total = np.zeros_like(s)
        for amp, shift, slope in self.terms:
            total = total + amp * slope * self.stretch / np.cosh(shift + slope * s) ** 2
        return total


class TabulatedOcp(_Ocp):
    kind: Literal["tabulated"] = "tabulated"
    x: list[float] = Field(min_length=2, description="lithium fraction points, increasing")
    voltage_V_points: list[float] = Field(min_length=2, alias="voltage_V")
    end_slope_V: float = Field(-20.0, description="dU/dx beyond the table's ends (steep: the host is full or empty)")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _table(self) -> TabulatedOcp:
        if len(self.x) != len(self.voltage_V_points):
            raise ValueError("x and voltage_V need one value each per point")
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise ValueError("x must increase strictly")
        return self

    def voltage_V(self, x, thermal_V: float = 0.0):
        xs, vs = np.asarray(self.x), np.asarray(self.voltage_V_points)
        x = np.asarray(x, dtype=float)
        v = np.interp(x, xs, vs)
        return v + self.end_slope_V * (np.clip(x - xs[-1], 0, None) - np.clip(xs[0] - x, 0, None))

    def slope_V(self, x, thermal_V: float = 0.0):
        h = 1e-5
        return (self.voltage_V(np.asarray(x) + h) - self.voltage_V(np.asarray(x) - h)) / (2 * h)


class ConstantOcp(_Ocp):
    kind: Literal["constant"] = "constant"
    potential_V: float = Field(0.0, description="vs Li/Li+: 0 for Li metal, about 0.62 for Li-In")

    def voltage_V(self, x=0.0, thermal_V: float = 0.0):
        return np.full_like(np.asarray(x, dtype=float), self.potential_V)

    def slope_V(self, x=0.0, thermal_V: float = 0.0):
        return np.zeros_like(np.asarray(x, dtype=float))


Ocp = Annotated[RegularSolutionOcp | TanhSeriesOcp | TabulatedOcp | ConstantOcp, Field(discriminator="kind")]
