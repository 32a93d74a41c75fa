"""Butler-Volmer charge transfer with a symmetric barrier (alpha = 0.5).

Anodic current (oxidation: delithiating a host, stripping lithium) is positive.
The exchange current follows the concentration dependence of transition-state
theory, i0 = F A k0 c_max sqrt(x (1 - x)) (electrolyte factor folded into k0),
written here as ``i0_ref * 2 sqrt(x (1 - x))`` so that ``i0_ref`` is the value at
x = 0.5 and the charge-transfer resistance there is kT / (e i0_ref).
"""

from __future__ import annotations

import numpy as np

EXCHANGE_FLOOR = 1e-6  # i0 never quite zero: a full or empty host still exchanges a little at its surface


def exchange_current_A(i0_ref_A, x):
    x = np.clip(x, 0.0, 1.0)
    return i0_ref_A * np.maximum(2.0 * np.sqrt(x * (1.0 - x)), EXCHANGE_FLOOR)


def exchange_current_slope_A(i0_ref_A, x):
    """d i0 / d x, for the impedance linearisation."""
    x = np.clip(x, 1e-6, 1 - 1e-6)
    root = np.sqrt(x * (1.0 - x))
    active = 2.0 * root > EXCHANGE_FLOOR
    return np.where(active, i0_ref_A * (1.0 - 2.0 * x) / root, 0.0)


def current_A(i0_A, overpotential_V, thermal_V: float):
    """Faradaic current for an overpotential (anodic positive)."""
    return 2.0 * i0_A * np.sinh(overpotential_V / (2.0 * thermal_V))


def overpotential_V(current_A, i0_A, thermal_V: float):
    """The overpotential that drives a current: the inverse of ``current_A``."""
    return 2.0 * thermal_V * np.arcsinh(current_A / (2.0 * i0_A))


def conductance_S(i0_A, overpotential_V, thermal_V: float):
    """dI/d(eta): the small-signal inverse charge-transfer resistance at this overpotential."""
    return i0_A / thermal_V * np.cosh(overpotential_V / (2.0 * thermal_V))
