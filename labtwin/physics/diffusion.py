"""Solid-state diffusion of lithium in a film (planar) or a particle (spherical), by finite volumes.

The host is cut into ``n_volumes`` shells (planar: slabs from the current
collector to the electrolyte; spherical: shells from the centre to the
surface), optionally graded so the shells next to the surface are thinner
(a fast voltammogram only probes nanometres). Unknown per shell: the lithium
fraction x. Charge balance per shell, in coulombs (Q = the host's charge
capacity, phi_i = its volume share):

    Q phi_i dx_i/dt = G_{i-1}(x_{i-1} - x_i) + G_i (x_{i+1} - x_i) - [i = surface] I_anodic

G_i = Q (D / L^2) a_i / d_i with a_i the face area per volume (1 planar, 3 xi^2
spherical) and d_i the centre distance, all in units of the length L.
Time steps are backward Euler: unconditionally stable, and the tridiagonal
solve gives x after a step as ``a + b I`` so a caller can find the current
that meets a voltage or a double-layer balance without another solve. The
impedance uses the very same matrices (jw M + K), so a Nyquist plot and a
pulse response of the model agree.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.linalg import solve_banded


class DiffusionParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    geometry: Literal["planar", "spherical"]
    length_m: float = Field(gt=0, description="film thickness (planar) or particle radius (spherical)")
    diffusivity_m2_s: float = Field(gt=0)
    n_volumes: int = Field(20, ge=2, le=400)
    surface_refinement: float = Field(
        1.0, gt=0, le=1, description="width ratio of neighbouring shells toward the surface; 1 = uniform"
    )


class FiniteVolumeDiffusion:
    def __init__(self, p: DiffusionParameters, capacity_C: float, initial_x: float) -> None:
        self.p = p
        n = p.n_volumes
        widths = p.surface_refinement ** np.arange(n)
        widths /= widths.sum()
        faces = np.concatenate([[0.0], np.cumsum(widths)])
        faces[-1] = 1.0
        centres = 0.5 * (faces[:-1] + faces[1:])
        if p.geometry == "planar":
            self.share = widths.copy()
            area = np.ones(n - 1)
        else:
            self.share = faces[1:] ** 3 - faces[:-1] ** 3
            area = 3.0 * faces[1:-1] ** 2
        self._area_over_distance = area / np.diff(centres)
        self.capacity_C = capacity_C
        self.diffusivity_m2_s = p.diffusivity_m2_s
        self.x = np.full(n, float(initial_x))
        self._banded = np.zeros((3, n))
        self._rhs = np.zeros((n, 2))

    @property
    def surface_x(self) -> float:
        return float(self.x[-1])

    @property
    def mean_x(self) -> float:
        return float(self.share @ self.x)

    def set_capacity(self, capacity_C: float) -> None:
        """Loss of active material: the host shrinks, its lithium fraction does not change."""
        self.capacity_C = capacity_C

    def _conductance(self, diffusivity_m2_s: float) -> np.ndarray:
        return self.capacity_C * diffusivity_m2_s / self.p.length_m**2 * self._area_over_distance

    def step_response(self, dt_s: float, diffusivity_m2_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) with x(t + dt) = a + b * I_anodic for a current held over dt."""
        g = self._conductance(diffusivity_m2_s or self.diffusivity_m2_s)
        mass = self.capacity_C * self.share / dt_s
        ab = self._banded
        ab[1] = mass
        ab[1, :-1] += g
        ab[1, 1:] += g
        ab[0, 1:] = -g
        ab[2, :-1] = -g
        rhs = self._rhs
        rhs[:, 0] = mass * self.x
        rhs[:, 1] = 0.0
        rhs[-1, 1] = -1.0
        sol = solve_banded((1, 1), ab, rhs, overwrite_ab=False, overwrite_b=False, check_finite=False)
        return sol[:, 0], sol[:, 1]

    def surface_response(self, omega_rad_s: np.ndarray, diffusivity_m2_s: float | None = None) -> np.ndarray:
        """delta x_surface / delta I_anodic at each angular frequency (complex, negative real part):
        the last diagonal element of (jw M + K)^-1, by forward elimination vectorised over frequency."""
        g = self._conductance(diffusivity_m2_s or self.diffusivity_m2_s)
        jwm = 1j * np.outer(omega_rad_s, self.capacity_C * self.share)
        n = self.p.n_volumes
        diag = jwm.copy()
        diag[:, :-1] += g
        diag[:, 1:] += g
        pivot = diag[:, 0]
        for i in range(1, n):
            pivot = diag[:, i] - g[i - 1] ** 2 / pivot
        return -1.0 / pivot
