"""Physical constants and the thermal voltage every kinetic and thermodynamic law needs."""

from __future__ import annotations

FARADAY_C_per_mol = 96485.33212
GAS_CONSTANT_J_per_mol_K = 8.314462618
ZERO_CELSIUS_K = 273.15


def thermal_voltage_V(temperature_C: float) -> float:
    """kT/e (= RT/F): 25.69 mV at 25 C. Regular-solution energies are given in eV so that
    divided by e they are volts and compare directly with this."""
    return GAS_CONSTANT_J_per_mol_K * (temperature_C + ZERO_CELSIUS_K) / FARADAY_C_per_mol


def arrhenius_factor(activation_energy_J_per_mol: float, temperature_C: float, reference_C: float = 25.0) -> float:
    """How much faster a thermally activated rate (exchange current, diffusivity, ionic
    conductivity) is at temperature_C than at the reference temperature."""
    import math

    if activation_energy_J_per_mol == 0.0:
        return 1.0
    t = temperature_C + ZERO_CELSIUS_K
    t_ref = reference_C + ZERO_CELSIUS_K
    return math.exp(activation_energy_J_per_mol / GAS_CONSTANT_J_per_mol_K * (1.0 / t_ref - 1.0 / t))
