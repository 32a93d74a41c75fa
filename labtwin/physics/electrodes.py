"""Electrodes: an insertion host with solid diffusion, a metal counter electrode, lithium plated on a substrate.

Every electrode answers the same three questions, so a cell can put any two
together (half cells vs Li or Li-In, or full cells):

- ``trial(dt, I, thermal_V)``: its potential vs Li/Li+ at the end of dt if the
  anodic current I (oxidation positive) is held, without changing its state;
- ``commit(trial)``: make that trial the new state;
- ``impedance_ohm(omega, thermal_V)``: the small-signal impedance of the same
  equations linearised around the present state.

A double-layer capacitance in parallel with the faradaic reaction is part of
the time-domain model too (backward Euler, so it is stable at any step and
relaxes to the quasi-steady answer when dt >> R_ct C_dl): the pulse response
and the Nyquist plot come from the same equations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labtwin.physics import kinetics
from labtwin.physics.constants import arrhenius_factor, thermal_voltage_V
from labtwin.physics.diffusion import DiffusionParameters, FiniteVolumeDiffusion
from labtwin.physics.ocp import ConstantOcp, Ocp


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def solve_double_layer(
    faradaic_potential: Callable[[float], tuple[float, float]],
    applied_A: float,
    previous_V: float,
    dt_s: float,
    capacitance_F: float,
    guess_A: float,
) -> tuple[float, float]:
    """The faradaic current I_f and potential phi with C (phi - phi0)/dt + I_f = I_applied.

    ``faradaic_potential(I_f)`` returns (phi, dphi/dI_f), increasing in I_f, so
    the residual is monotone and a safeguarded Newton iteration converges.
    """
    if capacitance_F <= 0.0:
        phi, _ = faradaic_potential(applied_A)
        return applied_A, phi
    k = dt_s / capacitance_F
    current = guess_A
    lo, hi = -math.inf, math.inf
    for _ in range(50):
        phi, slope = faradaic_potential(current)
        residual = phi - previous_V - (applied_A - current) * k
        if residual > 0:
            hi = min(hi, current)
        else:
            lo = max(lo, current)
        step = residual / (slope + k)
        new = current - step
        if not (lo < new < hi):
            if math.isfinite(lo) and math.isfinite(hi):
                new = 0.5 * (lo + hi)
            else:
                new = current - math.copysign(min(abs(step), 10 * abs(applied_A) + 1e-9), step)
        if abs(new - current) <= 1e-12 + 1e-9 * abs(current):
            current = new
            break
        current = new
    phi, _ = faradaic_potential(current)
    return current, phi


# --------------------------------------------------------------------------- insertion host


class InsertionElectrodeParameters(_Params):
    kind: Literal["insertion"] = "insertion"
    ocp: Ocp
    capacity_Ah: float = Field(gt=0, description="charge of the host from x = 0 to x = 1")
    initial_x: float = Field(ge=0, le=1, description="lithium fraction at assembly")
    exchange_current_A: float = Field(gt=0, description="i0 at x = 0.5; R_ct = kT / (e i0) there")
    double_layer_F: float = Field(0.0, ge=0)
    diffusion: DiffusionParameters | None = Field(None, description="None: a host small enough to stay uniform")
    kinetics_activation_J_per_mol: float = Field(0.0, ge=0)
    diffusion_activation_J_per_mol: float = Field(0.0, ge=0)


@dataclass
class _InsertionTrial:
    dt_s: float
    applied_A: float
    faradaic_A: float
    potential_V: float
    a: np.ndarray
    b: np.ndarray


class InsertionElectrode:
    """An insertion host (LCO, LTO as a solid solution, graphite) with Butler-Volmer kinetics."""

    def __init__(self, p: InsertionElectrodeParameters) -> None:
        self.p = p
        self.capacity_scale = 1.0
        self.exchange_scale = 1.0
        self.temperature_C = 25.0
        diffusion = p.diffusion or DiffusionParameters(
            geometry="planar", length_m=1e-6, diffusivity_m2_s=1.0, n_volumes=2
        )
        self.diffusion = FiniteVolumeDiffusion(diffusion, p.capacity_Ah * 3600.0, p.initial_x)
        self.faradaic_A = 0.0
        self.potential_V = float(p.ocp.voltage_V(p.initial_x, thermal_voltage_V(self.temperature_C)))

    # state -------------------------------------------------------------
    @property
    def lithium_fraction(self) -> float:
        return self.diffusion.mean_x

    @property
    def surface_x(self) -> float:
        return self.diffusion.surface_x

    def set_capacity_scale(self, scale: float) -> None:
        self.capacity_scale = scale
        self.diffusion.set_capacity(self.p.capacity_Ah * 3600.0 * scale)

    def _i0_ref(self) -> float:
        return (
            self.p.exchange_current_A
            * self.exchange_scale
            * arrhenius_factor(self.p.kinetics_activation_J_per_mol, self.temperature_C)
        )

    def _diffusivity(self) -> float:
        return self.diffusion.diffusivity_m2_s * arrhenius_factor(
            self.p.diffusion_activation_J_per_mol, self.temperature_C
        )

    def ocv_V(self, thermal_V: float) -> float:
        return float(self.p.ocp.voltage_V(self.surface_x, thermal_V))

    # time domain -------------------------------------------------------
    def trial(self, dt_s: float, applied_A: float, thermal_V: float) -> _InsertionTrial:
        a, b = self.diffusion.step_response(dt_s, self._diffusivity())
        a_s, b_s = float(a[-1]), float(b[-1])
        ocp = self.p.ocp
        i0_ref = self._i0_ref()

        def faradaic(current_A: float) -> tuple[float, float]:
            xs = min(max(a_s + b_s * current_A, 1e-9), 1 - 1e-9)
            i0 = float(kinetics.exchange_current_A(i0_ref, xs))
            u = float(ocp.voltage_V(xs, thermal_V))
            eta = float(kinetics.overpotential_V(current_A, i0, thermal_V))
            slope = float(ocp.slope_V(xs, thermal_V)) * b_s + 2 * thermal_V / math.sqrt(
                4 * i0 * i0 + current_A * current_A
            )
            return u + eta, max(slope, 1e-12)

        current, phi = solve_double_layer(
            faradaic, applied_A, self.potential_V, dt_s, self.p.double_layer_F, self.faradaic_A
        )
        return _InsertionTrial(dt_s, applied_A, current, phi, a, b)

    def commit(self, t: _InsertionTrial) -> None:
        self.diffusion.x = np.clip(t.a + t.b * t.faradaic_A, 0.0, 1.0)
        self.faradaic_A = t.faradaic_A
        self.potential_V = t.potential_V

    # frequency domain --------------------------------------------------
    def impedance_ohm(self, omega_rad_s: np.ndarray, thermal_V: float) -> np.ndarray:
        xs = self.surface_x
        i0_ref = self._i0_ref()
        i0 = float(kinetics.exchange_current_A(i0_ref, xs))
        di0 = float(kinetics.exchange_current_slope_A(i0_ref, xs))
        current = self.faradaic_A
        root = math.sqrt(4 * i0 * i0 + current * current)
        d_eta_dI = 2 * thermal_V / root
        d_eta_di0 = -2 * thermal_V * current / (i0 * root)
        chi = self.diffusion.surface_response(omega_rad_s, self._diffusivity())
        z_far = d_eta_dI + (float(self.p.ocp.slope_V(xs, thermal_V)) + d_eta_di0 * di0) * chi
        return 1.0 / (1j * omega_rad_s * self.p.double_layer_F + 1.0 / z_far)


# --------------------------------------------------------------------------- metal counter electrode


class MetalElectrodeParameters(_Params):
    """Lithium metal or Li-In: a fixed potential and its charge-transfer kinetics (no inventory limit)."""

    kind: Literal["metal"] = "metal"
    ocp: ConstantOcp = Field(default_factory=ConstantOcp)
    exchange_current_A: float = Field(gt=0)
    double_layer_F: float = Field(0.0, ge=0)


@dataclass
class _MetalTrial:
    faradaic_A: float
    potential_V: float
    dt_s: float = 0.0
    applied_A: float = 0.0


class MetalElectrode:
    def __init__(self, p: MetalElectrodeParameters) -> None:
        self.p = p
        self.exchange_scale = 1.0
        self.faradaic_A = 0.0
        self.potential_V = p.ocp.potential_V

    def _i0(self) -> float:
        return self.p.exchange_current_A * self.exchange_scale

    def ocv_V(self, thermal_V: float) -> float:
        return self.p.ocp.potential_V

    def trial(self, dt_s: float, applied_A: float, thermal_V: float) -> _MetalTrial:
        i0 = self._i0()
        u = self.p.ocp.potential_V

        def faradaic(current_A: float) -> tuple[float, float]:
            root = math.sqrt(4 * i0 * i0 + current_A * current_A)
            return u + 2 * thermal_V * math.asinh(current_A / (2 * i0)), 2 * thermal_V / root

        current, phi = solve_double_layer(
            faradaic, applied_A, self.potential_V, dt_s, self.p.double_layer_F, self.faradaic_A
        )
        return _MetalTrial(current, phi, dt_s, applied_A)

    def commit(self, t: _MetalTrial) -> None:
        self.faradaic_A, self.potential_V = t.faradaic_A, t.potential_V

    def impedance_ohm(self, omega_rad_s: np.ndarray, thermal_V: float) -> np.ndarray:
        r_ct = 2 * thermal_V / math.sqrt(4 * self._i0() ** 2 + self.faradaic_A**2)
        return 1.0 / (1j * omega_rad_s * self.p.double_layer_F + 1.0 / r_ct)


# --------------------------------------------------------------------------- lithium plated on a substrate


class PlatedLithiumParameters(_Params):
    """Lithium plated on a bare substrate (Cu): the working electrode of a Li||Cu cell (seed 002).

    The reaction runs on the area covered by lithium: coverage
    theta = (q + q_seed) / (q + q_seed + q_cover) for a plated inventory q. With
    nothing plated, theta is small and plating needs a nucleation overpotential;
    as the inventory is stripped away, the same law drives the potential up, which
    ends a stripping step. A share of each plated coulomb is lost to SEI and dead
    lithium, so Coulombic efficiency is 1 - loss_fraction.
    """

    kind: Literal["plated_lithium"] = "plated_lithium"
    exchange_current_A: float = Field(gt=0, description="on a fully covered electrode")
    cover_charge_C: float = Field(gt=0, description="plated charge that covers half the substrate")
    seed_charge_C: float = Field(gt=0, description="equivalent charge of native nucleation sites")
    loss_fraction: float = Field(0.0, ge=0, lt=1, description="share of plated charge lost to SEI and dead Li")
    initial_inventory_C: float = Field(0.0, ge=0)
    double_layer_F: float = Field(0.0, ge=0)


@dataclass
class _PlatedTrial:
    faradaic_A: float
    potential_V: float
    dt_s: float
    inventory_C: float


class PlatedLithiumElectrode:
    def __init__(self, p: PlatedLithiumParameters) -> None:
        self.p = p
        self.exchange_scale = 1.0
        self.inventory_C = p.initial_inventory_C
        self.dead_C = 0.0
        self.faradaic_A = 0.0
        self.potential_V = 0.0

    def _i0(self, inventory_C: float, plating: bool = True) -> float:
        """Exchange current on the covered area. Native nucleation sites help plating only:
        stripping needs plated lithium, so its coverage goes to zero with the inventory."""
        q = max(inventory_C, 0.0) + (self.p.seed_charge_C if plating else 0.0)
        return self.p.exchange_current_A * self.exchange_scale * max(q / (q + self.p.cover_charge_C), 1e-9)

    def ocv_V(self, thermal_V: float) -> float:
        return 0.0 if self.inventory_C > 0 else self.potential_V

    def _after(self, current_A: float, dt_s: float) -> float:
        if current_A >= 0:  # stripping
            return self.inventory_C - current_A * dt_s
        return self.inventory_C - current_A * dt_s * (1.0 - self.p.loss_fraction)

    def trial(self, dt_s: float, applied_A: float, thermal_V: float) -> _PlatedTrial:
        def faradaic(current_A: float) -> tuple[float, float]:
            # the coverage at the end of the step sets the kinetics (implicit in the inventory)
            i0 = self._i0(max(self._after(current_A, dt_s), 0.0), plating=current_A < 0)
            root = math.sqrt(4 * i0 * i0 + current_A * current_A)
            return 2 * thermal_V * math.asinh(current_A / (2 * i0)), 2 * thermal_V / root

        current, phi = solve_double_layer(
            faradaic, applied_A, self.potential_V, dt_s, self.p.double_layer_F, self.faradaic_A
        )
        return _PlatedTrial(current, phi, dt_s, self._after(current, dt_s))

    def commit(self, t: _PlatedTrial) -> None:
        if t.faradaic_A < 0:
            self.dead_C += -t.faradaic_A * t.dt_s * self.p.loss_fraction
        self.inventory_C = max(t.inventory_C, 0.0)
        self.faradaic_A, self.potential_V = t.faradaic_A, t.potential_V

    def impedance_ohm(self, omega_rad_s: np.ndarray, thermal_V: float) -> np.ndarray:
        i0 = self._i0(self.inventory_C, plating=self.faradaic_A < 0)
        r_ct = 2 * thermal_V / math.sqrt(4 * i0 * i0 + self.faradaic_A**2)
        return 1.0 / (1j * omega_rad_s * self.p.double_layer_F + 1.0 / r_ct)
