"""EIS analysis: circuit strings, CNLS fits with automatic guesses, Lin-KK, and the files labs have.

The measured spectra in tests/data/eis are physical dummy circuits
R0-p(R1,C1) (impedance.py's test data): the fit must find their values,
the two repeats of each must agree, and Lin-KK must accept them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labtwin.analysis.eis import CircuitError, SpectrumFileError, fit_circuit, lin_kk, parse_circuit, read_spectra

DATA = Path(__file__).resolve().parent / "data" / "eis"


def test_circuit_string_compiles_to_the_textbook_impedance():
    circuit = parse_circuit("R0-p(R1,CPE1)-Wo1")
    assert circuit.parameter_names == ["R0", "R1", "CPE1_0", "CPE1_1", "Wo1_0", "Wo1_1"]
    assert circuit.parameter_units == ["Ohm", "Ohm", "Ohm^-1 s^a", "", "Ohm", "s"]
    f = np.logspace(5, -2, 30)
    w = 2 * np.pi * f
    r0, r1, q, a, z0, tau = 10.0, 50.0, 2e-5, 0.85, 20.0, 3.0
    cpe = 1 / (q * (1j * w) ** a)
    s = np.sqrt(1j * w * tau)
    expected = r0 + 1 / (1 / r1 + 1 / cpe) + z0 / (s * np.tanh(s))
    np.testing.assert_allclose(circuit([r0, r1, q, a, z0, tau], f), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("R0-p(R1,X1)", "expected an element"),
        ("R0-p(R1,C1", "not closed"),
        ("R0-p(R1)", "at least two branches"),
        ("R0-R0", "appears twice"),
        ("", "empty circuit"),
        ("R0+R1", r"unexpected '\+'"),
    ],
)
def test_bad_circuit_strings_say_what_and_where(text, fragment):
    with pytest.raises(CircuitError, match=fragment):
        parse_circuit(text)


def test_fit_recovers_a_randles_cell_with_cpe_and_warburg_from_noisy_data_without_a_guess():
    truth = {"R0": 12.0, "R1": 85.0, "CPE1_0": 3e-5, "CPE1_1": 0.82, "Wo1_0": 40.0, "Wo1_1": 8.0}
    circuit = parse_circuit("R0-p(R1,CPE1)-Wo1")
    f = np.logspace(5, -2, 71)
    z = circuit(list(truth.values()), f)
    rng = np.random.default_rng(1)
    noisy = z + 0.003 * np.abs(z) * (rng.standard_normal(len(f)) + 1j * rng.standard_normal(len(f)))
    fit = fit_circuit(circuit, f, noisy)
    assert fit.relative_rms < 0.006
    for name, value in truth.items():
        assert fit.parameters[name] == pytest.approx(value, rel=0.05), name
        # The reported uncertainty is honest: the truth lies within 4 standard errors.
        assert abs(fit.parameters[name] - value) < 4 * fit.standard_errors[name], name


def test_interchangeable_arcs_come_out_ordered_fastest_first():
    circuit = parse_circuit("R0-p(R1,C1)-p(R2,C2)")
    f = np.logspace(6, -2, 65)
    slow_first = [5.0, 200.0, 1e-2, 40.0, 1e-7]  # R1 is the slow arc here
    fit = fit_circuit(circuit, f, circuit(slow_first, f))
    assert fit.parameters["R1"] == pytest.approx(40.0, rel=1e-3)
    assert fit.parameters["C1"] == pytest.approx(1e-7, rel=1e-3)
    assert fit.parameters["R2"] == pytest.approx(200.0, rel=1e-3)


def test_fixed_parameters_stay_fixed_and_unknown_ones_are_refused():
    circuit = parse_circuit("R0-p(R1,C1)")
    f = np.logspace(5, -1, 40)
    z = circuit([10.0, 50.0, 1e-5], f)
    fit = fit_circuit(circuit, f, z, fixed={"R0": 10.0})
    assert fit.parameters["R0"] == 10.0 and fit.standard_errors["R0"] == 0.0
    assert fit.parameters["R1"] == pytest.approx(50.0, rel=1e-6)
    with pytest.raises(ValueError, match="R9"):
        fit_circuit(circuit, f, z, fixed={"R9": 1.0})


@pytest.mark.parametrize("name", ["Circuit1", "Circuit2", "Circuit3"])
def test_measured_dummy_circuits_fit_agree_between_repeats_and_pass_lin_kk(name):
    fits = []
    for repeat in (1, 2):
        spectrum = read_spectra(DATA / f"{name}_EIS_{repeat}.z")[0]
        assert len(spectrum.frequency_Hz) > 40
        fit = fit_circuit("L0-R0-p(R1,C1)", spectrum.frequency_Hz, spectrum.impedance_ohm)
        assert fit.relative_rms < 0.01, fit.table()
        for p in ("R0", "R1", "C1"):
            assert fit.standard_errors[p] < 0.01 * fit.parameters[p]
        fits.append(fit)
        kk = lin_kk(spectrum.frequency_Hz, spectrum.impedance_ohm)
        assert kk.valid(0.01), (kk.n_elements, kk.mu, kk.max_residual)
    for p in ("R0", "R1", "C1"):
        assert fits[0].parameters[p] == pytest.approx(fits[1].parameters[p], rel=0.01), p


def test_lin_kk_rejects_a_spectrum_from_a_drifting_cell():
    spectrum = read_spectra(DATA / "Circuit1_EIS_1.z")[0]
    elapsed_s = np.cumsum(1.0 / spectrum.frequency_Hz)  # a sweep spends about one period per point
    drifting = spectrum.impedance_ohm * (
        1.0 + 0.05 * elapsed_s / elapsed_s[-1]
    )  # the cell changes 5 % during the sweep
    assert lin_kk(spectrum.frequency_Hz, spectrum.impedance_ohm).valid(0.01)
    assert not lin_kk(spectrum.frequency_Hz, drifting).valid(0.01)


def test_csv_readers_handle_bare_columns_headers_and_labtwin_eis_csv(tmp_path):
    f = np.array([1000.0, 100.0, 10.0, 1.0])
    z = np.array([10 - 1j, 12 - 5j, 20 - 8j, 30 - 3j])
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{a},{b.real},{b.imag}\n" for a, b in zip(f, z)))
    (spectrum,) = read_spectra(bare)
    np.testing.assert_allclose(spectrum.impedance_ohm, z)
    minus_im = tmp_path / "minus.csv"
    minus_im.write_text("freq/Hz,Re(Z)/Ohm,-Im(Z)/Ohm\n" + "".join(f"{a},{b.real},{-b.imag}\n" for a, b in zip(f, z)))
    np.testing.assert_allclose(read_spectra(minus_im)[0].impedance_ohm, z)
    runs = tmp_path / "eis.csv"
    runs.write_text(
        "frequency_Hz,z_real_ohm,z_imag_ohm,step,cycle\n"
        + "".join(f"{a},{b.real},{b.imag},{3 if k < 2 else 7},0\n" for k, (a, b) in enumerate(zip(f, z)))
    )
    spectra = read_spectra(runs)
    assert [len(s.frequency_Hz) for s in spectra] == [2, 2]
    assert spectra[1].label == "cycle 0 (step 7)"
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("time,voltage,current\n1,2,3\n")
    with pytest.raises(SpectrumFileError, match="frequency"):
        read_spectra(wrong)
    unknown = tmp_path / "spectrum.xyz"
    unknown.write_text("1,2,3\n")
    with pytest.raises(SpectrumFileError, match="unknown spectrum format"):
        read_spectra(unknown)
