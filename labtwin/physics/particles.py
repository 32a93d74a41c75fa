"""Many-particle phase-separating electrode: N grain groups sharing one electrode potential.

Seed 000 (LTO thin films) and the many-particle theory it cites (Dreyer et al.
2010) explain plateau oscillations by mosaic instability: every grain is a
regular solution, mu(x) = Omega (1 - 2x) + kT ln(x / (1 - x)); with Omega > 2 kT a
grain's equilibrium potential U(x) = U_eq - mu/e rises again inside the
spinodal, so a grain that gets ahead draws more current and runs through the
two-phase region on its own. Grains share the electrode potential V, so while
a group of them transforms the others must stand still (or even give lithium
back) and V swings; when the group is done V returns. Groups transform one
after another: oscillations whose period in capacity is the capacity of one
group. No sine is added anywhere: the oscillation is what these equations do.

Per group k (capacity share w_k, lithium fraction x_k; anodic current positive):

    I_k = w_k i0(x_k) 2 sinh((V - U_k(x_k)) / 2kT)              Butler-Volmer
    Q w_k dx_k/dt = -I_k + h_k (U_k - sum_j w_j U_j)              redistribution
    C_dl dV/dt = I_applied - sum_k I_k                           double layer

h_k = Q w_k k_r / kT: lithium moves between grains down the potential
difference at rate k_r (1/s per kT of difference). A fast k_r (a conductive
coating such as AZO(60)) feeds a transforming group from its neighbours
instead of from the external circuit, so V no longer swings: oscillations
vanish. Groups differ in size (log-normal) and in barrier Omega (normal
spread), so they reach their spinodal one after another.

How a grain transforms (``nucleation``):

- ``spinodal`` (bare films): a grain stays homogeneous until its state turns
  unstable, then runs through the two-phase region on its own: the mosaic
  instability above, and the plateau oscillates.
- ``interface``: the new phase nucleates at the grain's surface and grows at
  the common-tangent (Maxwell) potential, U_eq for a symmetric regular
  solution, so between its binodal compositions a grain's potential is flat
  and no grain is ever unstable. Seed 000 credits the AZO coating's faster Li
  redistribution for its smooth plateau; in this mean-field model faster
  inter-grain exchange alone does NOT smooth it: with homogeneous grains each
  of the last grains to transform drains its nearly full neighbours, whose
  potential is steep, and the whole electrode jumps 10-30 mV at the end of
  every plateau (measured, 2026-11). Redistribution fast enough to reach a
  grain's surface before its bulk turns unstable is what lets it grow a
  second phase instead, which this mode models.

Time stepping: backward Euler on all N + 1 unknowns, solved by Newton. The
Jacobian is diagonal plus two rank-one terms (the shared V and the mean U),
so each Newton step is O(N) vector work, no matrix. Steps adapt so no group's
x moves more than ``max_dx_per_step`` in one step (a grain crossing the
spinodal is fast; a plateau between crossings is slow).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from labtwin.physics import kinetics, particles_kernel
from labtwin.physics.constants import arrhenius_factor, thermal_voltage_V
from labtwin.physics.ocp import RegularSolutionOcp

X_EDGE = 1e-12
USE_KERNEL = True  # False: every step through the numpy reference (a test compares the two)


class ManyParticleParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["many_particle"] = "many_particle"
    ocp: RegularSolutionOcp
    capacity_Ah: float = Field(gt=0, description="charge of the whole electrode from x = 0 to 1")
    initial_x: float = Field(ge=0, le=1)
    n_groups: int = Field(200, ge=1, le=20000)
    exchange_current_A: float = Field(gt=0, description="electrode total i0 at x = 0.5")
    barrier_spread: float = Field(0.0, ge=0, lt=0.5, description="relative standard deviation of Omega across groups")
    size_spread: float = Field(0.0, ge=0, lt=2, description="log-normal sigma of the groups' capacity shares")
    redistribution_per_s: float = Field(0.0, ge=0, description="k_r: inter-grain lithium exchange rate per kT")
    double_layer_F: float = Field(0.0, ge=0)
    kinetics_activation_J_per_mol: float = Field(0.0, ge=0)
    nucleation: Literal["spinodal", "interface"] = Field(
        "spinodal",
        description="spinodal: homogeneous grains, mosaic instability; interface: two-phase grains at the common tangent",
    )
    population_seed: int = Field(0, description="seed of the groups' sizes and barriers: the same cell every time")
    max_dx_per_step: float = Field(0.02, gt=0, le=0.2)


@dataclass
class _ParticleTrial:
    dt_s: float
    applied_A: float
    x: np.ndarray
    potential_V: float
    faradaic_A: float


class ManyParticleElectrode:
    def __init__(self, p: ManyParticleParameters) -> None:
        self.p = p
        rng = np.random.default_rng(p.population_seed)
        n = p.n_groups
        sizes = np.exp(p.size_spread * rng.standard_normal(n)) if p.size_spread > 0 else np.ones(n)
        self.w = sizes / sizes.sum()
        spread = np.clip(p.barrier_spread * rng.standard_normal(n), -2.5 * p.barrier_spread, 2.5 * p.barrier_spread)
        self.omega_eV = p.ocp.interaction_eV * (1.0 + spread)
        self._binodal_cache: tuple[float, np.ndarray] | None = None
        self.capacity_scale = 1.0
        self.exchange_scale = 1.0
        self.temperature_C = 25.0
        self.x = np.full(n, float(p.initial_x))
        self.faradaic_A = 0.0
        self.potential_V = float(np.dot(self.w, self._u(self.x, thermal_voltage_V(self.temperature_C))))
        self._dt_hint = 1.0  # the last accepted sub-step length: where the next step starts
        self._pending_hint = 1.0

    # state --------------------------------------------------------------
    @property
    def lithium_fraction(self) -> float:
        return float(self.w @ self.x)

    @property
    def surface_x(self) -> float:
        return self.lithium_fraction

    def set_capacity_scale(self, scale: float) -> None:
        self.capacity_scale = scale

    def _q(self) -> float:
        return self.p.capacity_Ah * 3600.0 * self.capacity_scale

    def _i0_ref(self) -> float:
        return (
            self.p.exchange_current_A
            * self.exchange_scale
            * arrhenius_factor(self.p.kinetics_activation_J_per_mol, self.temperature_C)
        )

    def _binodal_x(self, kt: float) -> np.ndarray:
        """Lithium-poor binodal composition of each group (the rich one is 1 - x): where the homogeneous
        potential crosses the common tangent U_eq, i.e. kT ln((1 - x) / x) = Omega (1 - 2 x)."""
        if self._binodal_cache is not None and self._binodal_cache[0] == kt:
            return self._binodal_cache[1]
        ratio = self.omega_eV / kt
        x = np.where(ratio > 2.0, np.exp(-ratio), 0.5)
        for _ in range(60):  # Newton on f(x) = ln((1 - x) / x) - ratio (1 - 2 x), started left of the root
            f = np.log((1 - x) / x) - ratio * (1 - 2 * x)
            df = -1.0 / (x * (1 - x)) + 2 * ratio
            x = np.where(ratio > 2.0, np.clip(x - f / np.minimum(df, -1e-12), 1e-300, 0.5), 0.5)
        self._binodal_cache = (kt, x)
        return x

    def _two_phase(self, x: np.ndarray, kt: float) -> np.ndarray | None:
        """Groups between their binodals (flat potential), or None when grains nucleate at the spinodal."""
        if self.p.nucleation != "interface":
            return None
        low = self._binodal_x(kt)
        return (x > low) & (x < 1.0 - low)

    def _u(self, x: np.ndarray, kt: float) -> np.ndarray:
        x = np.clip(x, X_EDGE, 1 - X_EDGE)
        u = self.p.ocp.equilibrium_V - (self.omega_eV * (1 - 2 * x) + kt * np.log(x / (1 - x)))
        flat = self._two_phase(x, kt)
        return u if flat is None else np.where(flat, self.p.ocp.equilibrium_V, u)

    def ocv_V(self, thermal_V: float) -> float:
        """Open-circuit potential: where the groups' exchange currents balance (sum I_k = 0)."""
        u = self._u(self.x, thermal_V)
        i0 = self.w * kinetics.exchange_current_A(1.0, self.x)
        v = float(np.dot(i0, u) / i0.sum())
        for _ in range(30):
            s = np.sinh((v - u) / (2 * thermal_V))
            c = np.cosh((v - u) / (2 * thermal_V))
            f, df = float(i0 @ s), float(i0 @ c) / (2 * thermal_V)
            v -= f / df
            if abs(f / df) < 1e-9:
                break
        return v

    # the implicit step ----------------------------------------------------
    def _linearise(self, x: np.ndarray, v: float, kt: float):
        """Currents, potentials and the derivatives the Newton step and the impedance need.
        Written for few numpy calls: this is the inner loop of the whole simulator."""
        wi0 = self.w * self._i0_ref()
        xx = x * (1.0 - x)
        root = np.sqrt(xx)
        i0 = wi0 * np.maximum(2.0 * root, kinetics.EXCHANGE_FLOOR)
        di0 = wi0 * (1.0 - 2.0 * x) / root
        u = self.p.ocp.equilibrium_V - self.omega_eV * (1.0 - 2.0 * x) - kt * np.log(x / (1.0 - x))
        du = 2.0 * self.omega_eV - kt / xx
        flat = self._two_phase(x, kt)
        if flat is not None:
            u = np.where(flat, self.p.ocp.equilibrium_V, u)
            du = np.where(flat, 0.0, du)
        e = np.exp(np.clip((v - u) * (0.5 / kt), -60.0, 60.0))
        ie = 1.0 / e
        sh2 = e - ie  # 2 sinh
        g = i0 * (0.5 / kt) * (e + ie)  # dI_k/dV = i0 cosh / kT
        current = i0 * sh2
        a = di0 * sh2 - g * du  # dI_k/dx_k
        return current, u, du, g, a

    def _substep(self, x0: np.ndarray, v0: float, dt: float, applied_A: float, kt: float):
        """One backward-Euler step of length dt; None if it would move a group too far (retry shorter)."""
        q = self._q()
        qw_dt = q * self.w / dt
        h = q * self.w * (self.p.redistribution_per_s / kt)
        has_h = self.p.redistribution_per_s > 0
        c_dt = self.p.double_layer_F / dt
        w = self.w
        x, v = x0, v0
        for iteration in range(6):
            current, u, du, g, a = self._linearise(x, v, kt)
            if has_h:
                m = qw_dt + a - h * du
                r = qw_dt * (x0 - x) - current + h * (u - float(w @ u))
            else:
                m = qw_dt + a
                r = qw_dt * (x0 - x) - current
            if iteration == 0 and float((m / qw_dt).min()) <= 0.2:
                return None  # a group inside its spinodal grows faster than this step can follow
            f_v = c_dt * (v - v0) + float(current.sum()) - applied_A
            inv = 1.0 / m
            gi = g * inv
            if has_h:
                wu = w * du
                hi = h * inv
                a1, a2, a3 = float(a @ (r * inv)), float(a @ gi), float(a @ hi)
                p1, p2, hh = float(wu @ (r * inv)), float(wu @ gi), float(wu @ hi)
                denom = c_dt - a2 + a3 * p2 / (1 + hh) + float(g.sum())
                if not denom > 1e-300:
                    return None
                dv = (-f_v - a1 + a3 * p1 / (1 + hh)) / denom
                dx = (r - g * dv - h * ((p1 - dv * p2) / (1 + hh))) * inv
            else:
                a1, a2 = float(a @ (r * inv)), float(a @ gi)
                denom = c_dt - a2 + float(g.sum())
                if not denom > 1e-300:
                    return None  # singular linearisation: retry with a shorter step
                dv = (-f_v - a1) / denom
                dx = (r - g * dv) * inv
            x = np.clip(x + dx, X_EDGE, 1 - X_EDGE)
            v += dv
            if abs(dv) < 2e-6 and float(np.abs(dx).max()) < 1e-5:
                break
        else:
            # Six iterations and Newton still moves a lot: typically a full (or empty) host whose exchange
            # current is nearly zero, where the first linearisation sends the potential volts past the
            # answer and the grains stall against their clip (each iteration asks for a large x change the
            # clip undoes). Accepting it left the potential at ~5 V and nothing converged from there; a
            # shorter step follows the overpotential as it builds on the double layer. Small leftover
            # updates (grains inside their spinodal) are accepted as before.
            if abs(dv) > 1e-3 or float(np.abs(dx).max()) > self.p.max_dx_per_step:
                return None
        if float(np.abs(x - x0).max()) > self.p.max_dx_per_step or not math.isfinite(v):
            return None
        return x, v, applied_A - c_dt * (v - v0)

    def trial(self, dt_s: float, applied_A: float, thermal_V: float) -> _ParticleTrial:
        """The state after dt_s at the applied current: the compiled kernel (labtwin.physics.particles_kernel)
        where numba is installed, else ``_trial_reference``, the same algorithm in numpy."""
        if particles_kernel.trial is None or not USE_KERNEL:
            return self._trial_reference(dt_s, applied_A, thermal_V)
        flat = self.p.nucleation == "interface"
        low = self._binodal_x(thermal_V) if flat else np.zeros(0)
        status, x, v, faradaic, dt = particles_kernel.trial(
            np.ascontiguousarray(self.x, dtype=float),
            float(self.potential_V),
            float(self.faradaic_A),
            float(dt_s),
            float(self._dt_hint),
            float(applied_A),
            float(thermal_V),
            self.w,
            np.asarray(self.omega_eV, dtype=float),
            float(self.p.ocp.equilibrium_V),
            self.w * self._i0_ref(),
            kinetics.EXCHANGE_FLOOR,
            self._q(),
            float(self.p.redistribution_per_s),
            float(self.p.double_layer_F),
            float(self.p.max_dx_per_step),
            np.asarray(low, dtype=float),
            flat,
            X_EDGE,
        )
        if status != particles_kernel.DONE:
            raise FloatingPointError("many-particle step did not converge")
        self._pending_hint = dt
        return _ParticleTrial(dt_s, applied_A, x, v, faradaic)

    def _trial_reference(self, dt_s: float, applied_A: float, thermal_V: float) -> _ParticleTrial:
        """The time step in plain numpy: the readable reference the compiled kernel is held to."""
        x, v, done, faradaic = self.x, self.potential_V, 0.0, self.faradaic_A
        dt = min(self._dt_hint, dt_s)
        while done < dt_s - 1e-12:
            dt = min(dt, dt_s - done)
            result = self._substep(x, v, dt, applied_A, thermal_V)
            if result is None:
                dt *= 0.35
                if dt < 1e-9 * max(dt_s, 1.0):
                    raise FloatingPointError("many-particle step did not converge")
                continue
            moved = float(np.abs(result[0] - x).max())
            x, v, faradaic = result
            done += dt
            if moved < 0.3 * self.p.max_dx_per_step:
                dt *= 1.5
        self._pending_hint = dt
        return _ParticleTrial(dt_s, applied_A, x, v, faradaic)

    def commit(self, t: _ParticleTrial) -> None:
        self.x, self.potential_V, self.faradaic_A = t.x, t.potential_V, t.faradaic_A
        self._dt_hint = max(self._pending_hint, 1e-3)

    # frequency domain ---------------------------------------------------
    def impedance_ohm(self, omega_rad_s: np.ndarray, thermal_V: float) -> np.ndarray:
        """Linearise around the state: Y = G - sum a g / d + (sum a h / d) P / (1 + H), d_k = jw Q w_k + a_k - h_k u'_k."""
        current, u, du, g, a = self._linearise(self.x, self.potential_V, thermal_V)
        q = self._q()
        h = q * self.w * self.p.redistribution_per_s / thermal_V
        d = 1j * np.outer(omega_rad_s, q * self.w) + (a - h * du)
        inv = 1.0 / d
        wu = self.w * du
        p = inv @ (wu * g)
        hh = inv @ (wu * h)
        y = g.sum() - inv @ (a * g) + (inv @ (a * h)) * p / (1 + hh)
        return 1.0 / (1j * omega_rad_s * self.p.double_layer_F + y)
