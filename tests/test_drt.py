"""The distribution of relaxation times finds what a circuit has, and agrees with the circuit fit on real spectra
of a physical dummy circuit (two readings of one spectrum, neither told the other's answer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labtwin.analysis.eis import fit_circuit, fit_drt, parse_circuit, read_spectra

DATA = Path(__file__).parent / "data" / "eis"


def test_two_arcs_two_decades_apart_are_two_peaks_with_their_resistances():
    f = np.logspace(5, -2, 70)
    omega = 2 * np.pi * f
    z = 10 + 50 / (1 + 1j * omega * 1e-3) + 200 / (1 + 1j * omega * 1.0)
    noisy = z * (
        1 + 0.005 * (np.random.default_rng(1).standard_normal(70) + 1j * np.random.default_rng(2).standard_normal(70))
    )
    for spectrum in (z, noisy):
        drt = fit_drt(f, spectrum)
        assert [round(np.log10(p.tau_s)) for p in drt.peaks] == [-3, 0]
        assert [p.resistance_ohm for p in drt.peaks] == [pytest.approx(50, rel=0.03), pytest.approx(200, rel=0.03)]
        assert drt.relative_rms < 0.01


@pytest.mark.parametrize("name", ["Circuit1_EIS_1", "Circuit2_EIS_1", "Circuit3_EIS_1"])
def test_on_a_real_dummy_circuit_the_drt_peak_is_the_fitted_arc(name):
    (spectrum,) = read_spectra(DATA / f"{name}.z")
    fit = fit_circuit(parse_circuit("R0-p(R1,C1)"), spectrum.frequency_Hz, spectrum.impedance_ohm)
    drt = fit_drt(spectrum.frequency_Hz, spectrum.impedance_ohm)
    (peak,) = drt.peaks  # one RC arc, as the circuit has
    assert peak.tau_s == pytest.approx(fit.parameters["R1"] * fit.parameters["C1"], rel=0.15)
    assert peak.resistance_ohm == pytest.approx(fit.parameters["R1"], rel=0.05)


def test_too_few_points_is_said():
    with pytest.raises(ValueError, match="at least 8"):
        fit_drt([1e3, 1e2], [1 + 1j, 2 + 1j])
