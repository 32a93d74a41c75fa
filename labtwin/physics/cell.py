"""A physics-based cell: two electrodes, the electrolyte, interface layers, ageing, side reactions, faults.

    terminal V = phi_pos - phi_neg + sum(interface RC voltages) + I (R_series + contact)

phi_pos and phi_neg are the electrode potentials vs Li/Li+ from the electrode
models (many-particle, insertion with diffusion, metal, plated lithium),
interface layers (R_SEI, R_CI, R_AI as in seed 003, a coating as in seed 000)
are R||C elements stepped exactly for a current held over the step. The same
parameters give the small-signal impedance: each part is linearised around
its present state and the parts add in series, so ``impedance_ohm`` of a cell
and its response to a small current pulse agree.

Sign: positive current charges the cell (delithiates the positive host,
plates lithium at the negative).

The cell is a plain stepper: ``step(dt, mode, setpoint, compliance)`` holds a
current, a voltage or open circuit for dt and returns the voltage and current
at the end. Instruments (the simulated potentiostat) decide what to hold.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labtwin.physics.ageing import CapacityFade, ResistanceAgeing
from labtwin.physics.constants import arrhenius_factor, thermal_voltage_V
from labtwin.physics.electrodes import (
    InsertionElectrode,
    InsertionElectrodeParameters,
    MetalElectrode,
    MetalElectrodeParameters,
    PlatedLithiumElectrode,
    PlatedLithiumParameters,
)
from labtwin.physics.particles import ManyParticleElectrode, ManyParticleParameters

Mode = Literal["off", "open_circuit", "current", "voltage"]

ElectrodeParameters = Annotated[
    ManyParticleParameters | InsertionElectrodeParameters | MetalElectrodeParameters | PlatedLithiumParameters,
    Field(discriminator="kind"),
]

VOLTAGE_MODE_MAX_C_RATE = 1.0e5
"""The largest current (in C) a voltage-mode step may draw: the bracket of the current search."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InterfaceLayer(_Strict):
    """A resistive layer with its capacitance (SEI, cathode or anode interface, a coating)."""

    name: str
    resistance_ohm: float = Field(gt=0)
    capacitance_F: float = Field(gt=0)
    ageing: ResistanceAgeing | None = None
    growth_ohm_per_C: float = Field(0.0, ge=0, description="thickens with the charge side reactions consumed")


class SideReaction(_Strict):
    """Parasitic current at the positive electrode: electrolyte decomposition, SEI growth.

    While active it takes ``fraction`` of the current in its direction, so that
    charge never reaches the host (a first-cycle Coulombic efficiency below
    100 %). A finite ``capacity_Ah`` is a decomposition that stops when the
    reactive surface is used up (its share falls as it is consumed).
    """

    direction: Literal["charge", "discharge"]
    fraction: float = Field(gt=0, lt=1)
    capacity_Ah: float | None = Field(None, gt=0)
    onset_V: float | None = Field(None, description="active only beyond this positive-electrode potential")


class Fault(_Strict):
    """A fault that appears at a cell age (seconds since the cell model was created)."""

    kind: Literal["soft_short", "contact_loss", "temperature_step", "sensor_noise", "dropout"]
    at_time_s: float = Field(0.0, ge=0)
    duration_s: float | None = Field(
        None, gt=0, description="gone again after this long (an intermittent short); None: stays"
    )
    resistance_ohm: float | None = Field(None, gt=0, description="soft_short: leakage path; contact_loss: added series")
    delta_C: float = 0.0
    noise_V: float = Field(0.0, ge=0)
    probability: float = Field(0.0, ge=0, le=1, description="dropout: share of readings lost")


class CellParameters(_Strict):
    temperature_C: float = 25.0
    series_resistance_ohm: float = Field(ge=0, description="electrolyte / separator / contacts")
    series_activation_J_per_mol: float = Field(0.0, ge=0)
    interfaces: list[InterfaceLayer] = Field(default_factory=list)
    positive: ElectrodeParameters
    negative: ElectrodeParameters
    charge_transfer_ageing: ResistanceAgeing | None = Field(None, description="R_ct of the positive electrode")
    capacity_fade: CapacityFade | None = None
    side_reactions: list[SideReaction] = Field(default_factory=list)
    self_discharge_ohm: float | None = Field(None, gt=0)
    faults: list[Fault] = Field(default_factory=list)


def build_electrode(p):
    if isinstance(p, ManyParticleParameters):
        return ManyParticleElectrode(p)
    if isinstance(p, InsertionElectrodeParameters):
        return InsertionElectrode(p)
    if isinstance(p, MetalElectrodeParameters):
        return MetalElectrode(p)
    return PlatedLithiumElectrode(p)


class PhysicsCell:
    """Steps one cell; see the module docstring for the equations."""

    def __init__(self, p: CellParameters, nominal_capacity_Ah: float) -> None:
        self.p = p
        self.nominal_capacity_Ah = nominal_capacity_Ah
        self.positive = build_electrode(p.positive)
        self.negative = build_electrode(p.negative)
        self.age_s = 0.0
        self.throughput_Ah = 0.0
        self.faults: list[Fault] = list(p.faults)
        self.v_rc_V = np.zeros(len(p.interfaces))
        self.side_consumed_C = np.zeros(len(p.side_reactions))
        self.current_A = 0.0
        self._apply_ageing()
        self.voltage_V = self.open_circuit_voltage_V()

    # ---------------------------------------------------------------- conditions
    @property
    def temperature_C(self) -> float:
        return self.p.temperature_C + sum(f.delta_C for f in self._active("temperature_step"))

    def _active(self, kind: str) -> list[Fault]:
        return [
            f
            for f in self.faults
            if f.kind == kind
            and f.at_time_s <= self.age_s
            and (f.duration_s is None or self.age_s < f.at_time_s + f.duration_s)
        ]

    def inject(self, fault: Fault) -> None:
        """Add a fault at run time (tests of the twin's detectors do this)."""
        self.faults.append(fault)

    @property
    def cycles(self) -> float:
        return self.throughput_Ah / (2.0 * self.nominal_capacity_Ah)

    def _apply_ageing(self) -> None:
        n, hours = self.cycles, self.age_s / 3600.0
        t = self.temperature_C
        for electrode in (self.positive, self.negative):
            if hasattr(electrode, "temperature_C"):
                electrode.temperature_C = t
        if self.p.charge_transfer_ageing is not None:
            self.positive.exchange_scale = 1.0 / self.p.charge_transfer_ageing.factor(n, hours)
        if self.p.capacity_fade is not None and hasattr(self.positive, "set_capacity_scale"):
            self.positive.set_capacity_scale(self.p.capacity_fade.remaining(n))
        consumed = float(self.side_consumed_C.sum())
        self._r_layers = np.array(
            [
                layer.resistance_ohm * (layer.ageing.factor(n, hours) if layer.ageing else 1.0)
                + layer.growth_ohm_per_C * consumed
                for layer in self.p.interfaces
            ]
        )
        self._c_layers = np.array([layer.capacitance_F for layer in self.p.interfaces])
        contact = sum(f.resistance_ohm or 0.0 for f in self._active("contact_loss"))
        self._r_series = (
            self.p.series_resistance_ohm / arrhenius_factor(self.p.series_activation_J_per_mol, t) + contact
        )
        leaks = [f.resistance_ohm for f in self._active("soft_short") if f.resistance_ohm]
        if self.p.self_discharge_ohm:
            leaks.append(self.p.self_discharge_ohm)
        self._leak_S = sum(1.0 / r for r in leaks)

    def resistances_ohm(self) -> dict[str, float]:
        """The present resistances by name (what an EIS fit should recover)."""
        out = {"R_series": self._r_series}
        out.update({layer.name: float(r) for layer, r in zip(self.p.interfaces, self._r_layers)})
        kt = thermal_voltage_V(self.temperature_C)
        # The positive electrode's low-frequency limit: charge transfer plus solid diffusion.
        out["positive_dc_ohm"] = float(self.positive.impedance_ohm(np.array([1e-9]), kt).real[0])
        return out

    def open_circuit_voltage_V(self) -> float:
        kt = thermal_voltage_V(self.temperature_C)
        return self.positive.ocv_V(kt) - self.negative.ocv_V(kt)

    @property
    def lithium_fraction(self) -> float:
        return float(getattr(self.positive, "lithium_fraction", float("nan")))

    # ---------------------------------------------------------------- one step
    def _side_share(self, stack_A: float) -> np.ndarray:
        shares = np.zeros(len(self.p.side_reactions))
        for k, side in enumerate(self.p.side_reactions):
            if (side.direction == "charge") != (stack_A > 0) or stack_A == 0:
                continue
            if side.onset_V is not None:
                phi = self.positive.potential_V
                if (side.direction == "charge" and phi < side.onset_V) or (
                    side.direction == "discharge" and phi > side.onset_V
                ):
                    continue
            left = 1.0
            if side.capacity_Ah is not None:
                left = max(0.0, 1.0 - self.side_consumed_C[k] / (side.capacity_Ah * 3600.0))
            shares[k] = side.fraction * left
        return shares

    def _trial(self, dt_s: float, current_A: float, kt: float):
        stack = current_A - self._leak_S * self._internal_V
        shares = self._side_share(stack)
        host = stack * (1.0 - float(shares.sum()))
        tp = self.positive.trial(dt_s, host, kt)
        tn = self.negative.trial(dt_s, -stack, kt)
        tau = self._r_layers * self._c_layers
        decay = np.exp(-dt_s / tau) if len(tau) else tau
        v_rc = self.v_rc_V * decay + stack * self._r_layers * (1.0 - decay)
        internal = tp.potential_V - tn.potential_V + float(v_rc.sum())
        voltage = internal + current_A * self._r_series
        return voltage, (tp, tn, v_rc, internal, stack, shares)

    @property
    def _internal_V(self) -> float:
        return self.voltage_V - self.current_A * self._r_series

    def _commit(self, dt_s: float, current_A: float, voltage_V: float, parts) -> None:
        tp, tn, v_rc, internal, stack, shares = parts
        self.positive.commit(tp)
        self.negative.commit(tn)
        self.v_rc_V = v_rc
        self.side_consumed_C += shares * abs(stack) * dt_s
        self.throughput_Ah += abs(current_A) * dt_s / 3600.0
        self.age_s += dt_s
        self.current_A, self.voltage_V = current_A, voltage_V

    def _solve_voltage(self, dt_s: float, target_V: float, kt: float, lo_A: float, hi_A: float):
        """The current in [lo, hi] that ends the step at target_V (secant with bisection safeguard)."""
        i0 = min(max(self.current_A, lo_A), hi_A)
        v0, parts0 = self._trial(dt_s, i0, kt)
        delta = max(1e-3 * abs(i0), 1e-3 * self.nominal_capacity_Ah)  # ~1 mC/h: small against any step current
        i1 = min(max(i0 + (delta if target_V > v0 else -delta), lo_A), hi_A)
        if i1 == i0:
            return i0, v0, parts0
        v1, parts1 = self._trial(dt_s, i1, kt)
        best = (abs(v0 - target_V), i0, v0, parts0)
        a, b = lo_A, hi_A
        for _ in range(40):
            if abs(v1 - target_V) < best[0]:
                best = (abs(v1 - target_V), i1, v1, parts1)
            if best[0] < 2e-6:
                break
            if v1 > target_V:
                b = min(b, i1)
            else:
                a = max(a, i1)
            slope = (v1 - v0) / (i1 - i0) if i1 != i0 else 0.0
            i_new = i1 - (v1 - target_V) / slope if slope > 0 else 0.5 * (a + b)
            if not (a <= i_new <= b) or not math.isfinite(i_new):
                i_new = 0.5 * (a + b)
            i0, v0 = i1, v1
            i1 = i_new
            v1, parts1 = self._trial(dt_s, i1, kt)
            if abs(b - a) < 1e-15:
                break
        if abs(v1 - target_V) < best[0]:
            best = (abs(v1 - target_V), i1, v1, parts1)
        return best[1], best[2], best[3]

    def step(self, dt_s: float, mode: Mode, setpoint: float = 0.0, compliance: float = math.inf) -> tuple[float, float]:
        """Hold a setting for dt_s; returns (voltage_V, current_A) at the end.

        current mode: setpoint in A, compliance the voltage the source may not pass
        (it then holds that voltage, as an SMU does). voltage mode: setpoint in V,
        compliance the largest current magnitude.
        """
        if dt_s <= 0:
            return self.voltage_V, self.current_A
        self._apply_ageing()
        kt = thermal_voltage_V(self.temperature_C)
        if mode in ("off", "open_circuit"):
            current, (voltage, parts) = 0.0, self._trial(dt_s, 0.0, kt)
        elif mode == "current":
            current = setpoint
            voltage, parts = self._trial(dt_s, current, kt)
            if (current > 0 and voltage > compliance) or (current < 0 and voltage < compliance):
                lo, hi = (0.0, current) if current > 0 else (current, 0.0)
                current, voltage, parts = self._solve_voltage(dt_s, compliance, kt, lo, hi)
        else:
            # The current search is bracketed by the cell's own scale (1e5 C: a thin film's fast CV sweep draws
            # thousands of C, so 1000 C clipped seed 001's 0.5 V/s sweep into a safety trip) even when the source
            # allows more: an agent with no current limit passes 1000 A,
            # and on a nearly full 52 uAh film the search, meeting a negative slope, bisected that bracket to
            # 500 A, where the electrode needed 1e-8 s sub-steps: hours of wall time for one 1 s sample.
            limit = VOLTAGE_MODE_MAX_C_RATE * self.nominal_capacity_Ah
            if math.isfinite(compliance):
                limit = min(limit, abs(compliance))
            current, voltage, parts = self._solve_voltage(dt_s, setpoint, kt, -limit, limit)
        self._commit(dt_s, current, voltage, parts)
        return voltage, current

    # ---------------------------------------------------------------- impedance
    def impedance_ohm(self, frequency_Hz) -> np.ndarray:
        """Small-signal impedance at the present state (DC current included), one value per frequency."""
        self._apply_ageing()
        omega = 2 * np.pi * np.asarray(frequency_Hz, dtype=float)
        kt = thermal_voltage_V(self.temperature_C)
        z_internal = self.positive.impedance_ohm(omega, kt) + self.negative.impedance_ohm(omega, kt)
        for r, c in zip(self._r_layers, self._c_layers):
            z_internal = z_internal + r / (1 + 1j * omega * r * c)
        if self._leak_S > 0:
            z_internal = 1.0 / (1.0 / z_internal + self._leak_S)
        return self._r_series + z_internal
