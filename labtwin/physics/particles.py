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

Time stepping: variable-step BDF2 (second order, L-stable for the double layer and the grains pinned at the
edges) on all N + 1 unknowns, each sub-step solved by Newton. The Jacobian is diagonal plus two rank-one terms
(the shared V and the mean U), so each Newton step is O(N) vector work, no matrix. The step size is set by the
local error: the distance of the solution from the quadratic extrapolation of the last three states (which
is also Newton's first guess, so most sub-steps take one or two iterations), filtered through the Newton
matrix so that stiff components the implicit step damps (the double layer on a plateau) do not count, held
to ``error_tolerance_x`` on every group's x and ``error_tolerance_V`` on V. A grain crossing its spinodal is
fast, the plateau between crossings slow: sub-steps run from milliseconds to whole samples. Measured on one
0.1C cycle of the bare film (bench/sim_speed.py): 0.7 mV RMS from a converged reference (the tolerances /
1000) with ~15 000 sub-steps; the backward Euler it replaced, whose step was set by a fixed largest change of
x (0.02), was 1.5 mV with ~41 000.
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
    error_tolerance_x: float = Field(
        3e-4, gt=0, le=0.1, description="local error allowed per sub-step on each group's lithium fraction"
    )
    error_tolerance_V: float = Field(
        3e-5, gt=0, le=0.1, description="local error allowed per sub-step on the potential"
    )
    max_dx_per_step: float = Field(
        0.2, gt=0, le=0.5, description="a guard, not the step control: a sub-step that moves a group further is retried"
    )


@dataclass
class _ParticleTrial:
    """The state after a sample interval, packed as the kernel keeps it (particles_kernel's docstring): ``xs``
    rows x now and the two sub-steps before, ``sv`` the potential, its history, the faradaic current and the
    step controller's state, so the next interval's BDF2 and error estimate go on from where this one ended."""

    dt_s: float
    applied_A: float
    xs: np.ndarray
    sv: np.ndarray

    @property
    def x(self) -> np.ndarray:
        return self.xs[0]

    @property
    def potential_V(self) -> float:
        return float(self.sv[0])

    @property
    def faradaic_A(self) -> float:
        return float(self.sv[3])


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
        x = np.full(n, float(p.initial_x))
        v = float(np.dot(self.w, self._u(x, thermal_voltage_V(self.temperature_C))))
        # a constant past (the film at rest) and a first sub-step of 1 s: see _restart
        self._xs = np.vstack([x, x, x])
        self._sv = np.array([v, v, v, 0.0, 1.0, 1.0, 1.0, 1.0])
        self._pars = np.array(
            [
                p.ocp.equilibrium_V,
                self._i0_ref(),
                kinetics.EXCHANGE_FLOOR,
                self._q(),
                p.redistribution_per_s,
                p.double_layer_F,
                p.max_dx_per_step,
                X_EDGE,
                p.error_tolerance_x,
                p.error_tolerance_V,
                1.0 if p.nucleation == "interface" else 0.0,
            ]
        )
        self._no_binodal = np.zeros(0)
        self.counts = np.zeros(len(particles_kernel.COUNT_FIELDS), dtype=np.int64)  # work done, for the bench

    # state --------------------------------------------------------------
    @property
    def x(self) -> np.ndarray:
        return self._xs[0]

    @x.setter
    def x(self, value: np.ndarray) -> None:
        self._restart(np.asarray(value, dtype=float), self.potential_V)

    @property
    def potential_V(self) -> float:
        return float(self._sv[0])

    @potential_V.setter
    def potential_V(self, value: float) -> None:
        self._restart(self.x, float(value))

    @property
    def faradaic_A(self) -> float:
        return float(self._sv[3])

    def _restart(self, x: np.ndarray, v: float) -> None:
        """A state set from outside (a test's captured state) has no step history: BDF2 goes on as if the
        electrode had rested there, with the step proposal it had."""
        self._xs = np.vstack([x, x, x])
        h = float(self._sv[6])
        self._sv = np.array([v, v, v, self._sv[3], h, h, h, 1.0])

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
        # A group held at the edge of its range (X_EDGE: the log in U, which would stop it, is cut off there)
        # takes no more lithium that way: otherwise a trial current a full film cannot take (the cell's voltage
        # search tries some) left Butler-Volmer currents of 1e12 A in groups whose x could not move. "At the
        # edge" is within one X_EDGE of the clip, so that rounding (an x 1e-28 above it) cannot switch a group
        # in and out from one Newton iteration to the next (it did: Newton never settled).
        blocked = ((x >= 1 - 2 * X_EDGE) & (current < 0)) | ((x <= 2 * X_EDGE) & (current > 0))
        if blocked.any():
            current, g, a = np.where(blocked, 0.0, current), np.where(blocked, 0.0, g), np.where(blocked, 0.0, a)
        return current, u, du, g, a

    def _solve_reference(self, rx, rv, m, g, a, du, hq, c_dt):
        """The Newton matrix [[diag(m) - hq (w du)^T, g], [a^T, c_dt + sum g]] [dx; dv] = [rx; rv] in O(n): the
        diagonal, the shared V (g, a) and the mean U every group's redistribution sees (hq_k = Q w_k k_r / kT,
        zero without redistribution), by Sherman-Morrison. Returns (dx, dv), or None where it is singular."""
        inv = 1.0 / m
        wd = self.w * du
        a1, a2, a3 = float(a @ (rx * inv)), float(a @ (g * inv)), float(a @ (hq * inv))
        p1, p2, hh = float(wd @ (rx * inv)), float(wd @ (g * inv)), float(wd @ (hq * inv))
        denom = c_dt - a2 + a3 * p2 / (1.0 + hh) + float(g.sum())
        if not denom > 1e-300:
            return None
        dv = (rv - a1 + a3 * p1 / (1.0 + hh)) / denom
        return (rx - g * dv - hq * ((p1 - dv * p2) / (1.0 + hh))) * inv, dv

    def _newton_reference(self, x, v, xe, ve, he, applied_A, kt, theta):
        """Solve the implicit sub-step, Q w (x - xe) / he = -I + redistribution and C (V - ve) / he = I_applied
        - sum I, from the guess (x, v). Returns (x, v, theta, the last linearisation) or None (retry shorter)."""
        p, w, q = self.p, self.w, self._q()
        qw_he = q * w / he
        hq = q * w * (p.redistribution_per_s / kt)
        c_dt = p.double_layer_F / he
        dv, max_step, norm_prev = 0.0, 0.0, 0.0
        for iteration in range(particles_kernel.NEWTON_ITERATIONS):
            self.counts[1] += 1
            current, u, du, g, a = self._linearise(x, v, kt)
            m = qw_he + a - hq * du
            r = qw_he * (xe - x) - current + hq * (u - float(w @ u))
            if iteration == 0 and float((m / qw_he).min()) <= 0.2:
                return None  # a group inside its spinodal grows faster than this step can follow
            solved = self._solve_reference(r, applied_A - c_dt * (v - ve) - float(current.sum()), m, g, a, du, hq, c_dt)
            if solved is None:
                return None  # singular linearisation: retry with a shorter step
            dx, dv = solved
            max_step = float(np.abs(dx).max())
            x = np.clip(x + dx, X_EDGE, 1 - X_EDGE)
            v += dv
            norm = max(max_step / p.error_tolerance_x, abs(dv) / p.error_tolerance_V)
            if iteration > 0:
                theta = norm / norm_prev if norm_prev > 0.0 else 0.0
            norm_prev = norm
            if particles_kernel.newton_converged(iteration, norm, theta):
                return x, v, theta, (m, g, a, du, hq, c_dt)
        # Six iterations and Newton still moves a lot: typically a full (or empty) host whose exchange
        # current is nearly zero, where the first linearisation sends the potential volts past the
        # answer and the grains stall against their clip (each iteration asks for a large x change the
        # clip undoes). Accepting it left the potential at ~5 V and nothing converged from there; a
        # shorter step follows the overpotential as it builds on the double layer. Small leftover
        # updates (grains inside their spinodal) are accepted.
        if abs(dv) > 1e-3 or max_step > p.max_dx_per_step:
            return None
        return x, v, theta, (m, g, a, du, hq, c_dt)

    def trial(self, dt_s: float, applied_A: float, thermal_V: float) -> _ParticleTrial:
        """The state after dt_s at the applied current: the compiled kernel (labtwin.physics.particles_kernel)
        where numba is installed, else ``_trial_reference``, the same algorithm in numpy."""
        if particles_kernel.trial is None or not USE_KERNEL:
            return self._trial_reference(dt_s, applied_A, thermal_V)
        pars = self._pars
        pars[particles_kernel.I0_REF] = self._i0_ref()
        pars[particles_kernel.CHARGE] = self._q()
        low = self._binodal_x(thermal_V) if self.p.nucleation == "interface" else self._no_binodal
        status, xs, sv = particles_kernel.trial(
            self._xs,
            self._sv,
            self.w,
            self.omega_eV,
            low,
            pars,
            float(dt_s),
            float(applied_A),
            float(thermal_V),
            self.counts,
        )
        if status != particles_kernel.DONE:
            raise FloatingPointError("many-particle step did not converge")
        return _ParticleTrial(dt_s, applied_A, xs, sv)

    def _trial_reference(self, dt_s: float, applied_A: float, thermal_V: float) -> _ParticleTrial:
        """The sample interval in plain numpy: the readable reference the compiled kernel is held to."""
        p = self.p
        (x, x1, x2), (v, v1, v2, faradaic, h1, h2, h_next, theta) = self._xs, self._sv
        done, h_min, attempts = 0.0, particles_kernel.ERROR_FLOOR * dt_s, 0
        while done < dt_s - 1e-12:
            attempts += 1
            if attempts > particles_kernel.MAX_ATTEMPTS:
                raise FloatingPointError("many-particle step did not converge")
            h = particles_kernel.step_length(dt_s - done, h_next)
            c0, c1, c2 = particles_kernel.bdf2(h, h1)
            he = h / c0
            xp = particles_kernel.extrapolate(x, x1, x2, h, h1, h2)  # the quadratic through the last three states
            vp = particles_kernel.extrapolate(v, v1, v2, h, h1, h2)
            xe, ve = (c1 * x - c2 * x1) / c0, (c1 * v - c2 * v1) / c0
            solved = self._newton_reference(
                np.clip(xp, X_EDGE, 1 - X_EDGE), vp, xe, ve, he, applied_A, thermal_V, theta
            )
            if solved is None or float(np.abs(solved[0] - x).max()) > p.max_dx_per_step or not math.isfinite(solved[1]):
                self.counts[2] += 1
                h_next = h * particles_kernel.RETRY_SHRINK
                if h_next < 1e-9 * max(dt_s, 1.0):
                    raise FloatingPointError("many-particle step did not converge")
                continue
            xn, vn, theta_step, (m, g, a, du, hq, c_dt) = solved
            # Local error: the distance from the extrapolation times BDF2's error constant, filtered through
            # (I - he J)^-1 = (Newton matrix)^-1 diag(Q w / he, C / he): a component the implicit step damps
            # (the double layer on a plateau, a grain pinned at an edge) errs far less than it moved, one that
            # grows (a grain in its spinodal) more. Without the filter every current change looked like an
            # error of the whole overpotential; without V in it a full film's double layer, charging on its
            # own for seconds, went unchecked.
            lte = particles_kernel.error_constant(h, h1, h2)
            filtered = self._solve_reference(
                self._q() * self.w / he * (xn - xp) * lte, c_dt * (vn - vp) * lte, m, g, a, du, hq, c_dt
            )
            err = math.inf
            if filtered is not None:
                err = max(
                    float(np.abs(filtered[0]).max()) / p.error_tolerance_x, abs(filtered[1]) / p.error_tolerance_V
                )
                err = err if math.isfinite(err) else math.inf
            if err > 1.0 and h > 1.1 * h_min:  # below h_min the error control gives up (particles_kernel.ERROR_FLOOR)
                self.counts[3] += 1
                h_next = max(h * particles_kernel.step_factor(min(err, 1e300), False), h_min)
                continue
            self.counts[0] += 1
            faradaic = applied_A - c_dt * (vn - ve)
            x2, x1, x = x1, x, xn
            v2, v1, v = v1, v, vn
            h2, h1 = h1, h
            theta = theta_step
            done += h
            h_next = max(h * particles_kernel.step_factor(err, True), min(h_min, particles_kernel.GROWTH_MAX * h))
        return _ParticleTrial(
            dt_s, applied_A, np.vstack([x, x1, x2]), np.array([v, v1, v2, faradaic, h1, h2, h_next, theta])
        )

    def commit(self, t: _ParticleTrial) -> None:
        self._xs, self._sv = t.xs, t.sv

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
