"""Equivalent-circuit cell: open-circuit voltage + series resistance + one RC pair.

The spine's cell model, deliberately simple and exact for piecewise-constant
current: within an interval of constant current the RC branch relaxes as
v_rc(t+dt) = v_rc(t) a + I R1 (1 - a), a = exp(-dt / (R1 C1)), so any sample
interval is stable. Constant-voltage control solves for the current that puts
the terminal voltage on the setpoint at the end of the interval, linearising
the OCV over it (backward Euler in the charge).

``EcmCell`` steps one cell with the same interface as the physics-based
``labtwin.physics.cell.PhysicsCell``, so a simulated potentiostat takes either.

Sign: positive current charges (raises the state of charge).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator


class EcmParameters(BaseModel):
    """Parameters of one cell; units in the names. Loaded from labtwin/physics/cells/*.yaml."""

    model_config = ConfigDict(extra="forbid")

    capacity_Ah: float = Field(gt=0)
    ocv_soc: list[float] = Field(min_length=2, description="state of charge points, 0..1, increasing")
    ocv_voltage_V: list[float] = Field(min_length=2)
    series_resistance_ohm: float = Field(ge=0)
    rc_resistance_ohm: float = Field(0.0, ge=0)
    rc_capacitance_F: float = Field(1.0, gt=0)
    overcharge_slope_V: float = Field(
        50.0, ge=0, description="V per unit SOC beyond 0 or 1: a cell pushed past its ends runs away in voltage"
    )
    side_reaction_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the current consumed by side reactions (SEI) in the lossy direction"
    )
    side_reaction_direction: Literal["charge", "discharge"] = "charge"
    leakage_resistance_ohm: float | None = Field(None, gt=0, description="self-discharge path; None = none")
    temperature_C: float = 25.0
    initial_soc: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ocv_table(self) -> EcmParameters:
        if len(self.ocv_soc) != len(self.ocv_voltage_V):
            raise ValueError(
                f"ocv_soc has {len(self.ocv_soc)} points and ocv_voltage_V {len(self.ocv_voltage_V)}: give one voltage per SOC"
            )
        if any(b <= a for a, b in zip(self.ocv_soc, self.ocv_soc[1:])):
            raise ValueError("ocv_soc must increase strictly")
        return self


class EcmCell:
    """One equivalent-circuit cell with the same stepping interface as ``PhysicsCell``.

    Scalar float arithmetic on purpose: a channel steps one cell per sample, and
    numpy's per-call overhead on one-element arrays costs ~20x the arithmetic.
    """

    def __init__(self, p: EcmParameters, nominal_capacity_Ah: float | None = None) -> None:
        import bisect

        self.p = p
        self._bisect = bisect.bisect_right
        self._soc = list(p.ocv_soc)
        self._v = list(p.ocv_voltage_V)
        self._charge_C = p.capacity_Ah * 3600.0
        self.soc = p.initial_soc
        self.v_rc_V = 0.0
        self.age_s = 0.0
        self.current_A = 0.0
        self.temperature_C = p.temperature_C
        self.faults: list = []
        self.voltage_V = self.ocv_V(self.soc)

    def ocv_V(self, soc: float) -> float:
        pts, vs = self._soc, self._v
        if soc <= pts[0]:
            return vs[0] - self.p.overcharge_slope_V * (pts[0] - soc)
        if soc >= pts[-1]:
            return vs[-1] + self.p.overcharge_slope_V * (soc - pts[-1])
        k = self._bisect(pts, soc)
        f = (soc - pts[k - 1]) / (pts[k] - pts[k - 1])
        return vs[k - 1] + f * (vs[k] - vs[k - 1])

    def _slope(self, soc: float) -> float:
        return (self.ocv_V(soc + 1e-4) - self.ocv_V(soc - 1e-4)) / 2e-4

    def open_circuit_voltage_V(self) -> float:
        return self.ocv_V(self.soc)

    def _stored(self, current_A: float) -> float:
        p = self.p
        lossy = current_A > 0 if p.side_reaction_direction == "charge" else current_A < 0
        stored = current_A * (1.0 - p.side_reaction_fraction) if lossy else current_A
        if p.leakage_resistance_ohm is not None:
            stored -= self.ocv_V(self.soc) / p.leakage_resistance_ohm
        return stored

    def _decay(self, dt_s: float) -> float:
        p = self.p
        return math.exp(-dt_s / (p.rc_resistance_ohm * p.rc_capacitance_F)) if p.rc_resistance_ohm > 0 else 0.0

    def _end_voltage(self, current_A: float, dt_s: float, a: float) -> tuple[float, float, float]:
        p = self.p
        soc = self.soc + self._stored(current_A) * dt_s / self._charge_C
        v_rc = self.v_rc_V * a + current_A * p.rc_resistance_ohm * (1.0 - a)
        return self.ocv_V(soc) + current_A * p.series_resistance_ohm + v_rc, soc, v_rc

    def _current_for(self, voltage_V: float, dt_s: float, a: float) -> float:
        p = self.p
        resistance = (
            p.series_resistance_ohm + p.rc_resistance_ohm * (1.0 - a) + self._slope(self.soc) * dt_s / self._charge_C
        )
        return (voltage_V - self.ocv_V(self.soc) - self.v_rc_V * a) / resistance

    def step(self, dt_s: float, mode: str, setpoint: float = 0.0, compliance: float = math.inf) -> tuple[float, float]:
        if dt_s <= 0:
            return self.voltage_V, self.current_A
        a = self._decay(dt_s)
        if mode in ("off", "open_circuit"):
            current = 0.0
        elif mode == "current":
            current = setpoint
            v, _, _ = self._end_voltage(current, dt_s, a)
            if (current > 0 and v > compliance) or (current < 0 and v < compliance):
                limited = self._current_for(compliance, dt_s, a)
                current = min(current, max(limited, 0.0)) if current > 0 else max(current, min(limited, 0.0))
        else:
            current = self._current_for(setpoint, dt_s, a)
            if math.isfinite(compliance):
                current = max(-abs(compliance), min(abs(compliance), current))
        v, self.soc, self.v_rc_V = self._end_voltage(current, dt_s, a)
        self.voltage_V, self.current_A = v, current
        self.age_s += dt_s
        return v, current

    def impedance_ohm(self, frequency_Hz) -> np.ndarray:
        """R0 + R1 || C1 + the state-of-charge 'capacitor' (dOCV/dSOC over the charge): linearised OCV."""
        p = self.p
        w = 2 * np.pi * np.asarray(frequency_Hz, dtype=float)
        z = p.series_resistance_ohm + (p.rc_resistance_ohm / (1 + 1j * w * p.rc_resistance_ohm * p.rc_capacitance_F))
        return z + self._slope(self.soc) / (1j * w * self._charge_C)

    def inject(self, fault) -> None:
        self.faults.append(fault)

    @property
    def lithium_fraction(self) -> float:
        return 1.0 - self.soc
