"""The simulated cells reproduce the seeds' signatures for physical reasons (PHYSICS.md's table).

Model-level runs (the cell stepped directly, as the simulated potentiostat does
between samples) keep these fast; tests/integration/test_cli.py runs
a seed protocol end to end through Prefect, MQTT and the agent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from labtwin.analysis.plateau import plateau_oscillation
from labtwin.documents import SweepSettings
from labtwin.physics.cell import Fault
from labtwin.physics.constants import FARADAY_C_per_mol, thermal_voltage_V
from labtwin.physics.library import available_cells, load_cell

LTO_AREA_cm2 = 1.89
LCO_MASS_g = 7.29e-3


def galvanostatic(model, current_A: float, stop_V: float, dt_s: float, compliance_V: float | None = None):
    """Hold a current until the voltage passes stop_V; returns (voltage_V, charge_Ah) arrays."""
    v_out, q_out, q = [], [], 0.0
    comp = stop_V if compliance_V is None else compliance_V
    for _ in range(200_000):
        v, i = model.step(dt_s, "current", current_A, comp)
        q += i * dt_s / 3600.0
        v_out.append(v)
        q_out.append(q)
        if (current_A > 0 and v >= stop_V - 1e-6) or (current_A < 0 and v <= stop_V + 1e-6):
            break
    return np.array(v_out), np.array(q_out)


def test_every_library_cell_loads_with_a_source_for_every_parameter():
    names = available_cells()
    for required in (
        "lto-thin-film",
        "lto-thin-film-azo60",
        "lfp",
        "li-metal-cu",
        "lco-lgps-bare",
        "lco-lgps-ceramic",
        "lco-lgps-glassy-ceramic",
        "lco-lgps-pristine",
        "lco-lgps-one-shell",
        "lco-lgps-dual-shell",
    ):
        assert required in names
    for name in names:
        cell = load_cell(name)
        model = cell.build_model()
        assert math.isfinite(model.open_circuit_voltage_V())


@pytest.fixture(scope="module")
def lto_oscillations():
    out = {}
    for name, c_rate, dt in (
        ("lto-thin-film", 0.1, 10.0),
        ("lto-thin-film", 0.025, 40.0),
        ("lto-thin-film-azo60", 0.1, 10.0),
    ):
        cell = load_cell(name)
        model = cell.build_model()
        v, q = galvanostatic(model, -c_rate * cell.nominal_capacity_Ah, 0.1, dt)
        out[(name, c_rate)] = plateau_oscillation(-q, v)
    return out


def test_bare_lto_plateau_oscillates_as_published(lto_oscillations):
    # seed 000: about 2.52 mV and 0.67 uAh/cm2 at 0.1C; the band: 1.5-4 mV, 0.4-1.0 uAh/cm2
    r = lto_oscillations[("lto-thin-film", 0.1)]
    period = r.period_Ah * 1e6 / LTO_AREA_cm2
    assert 1.5e-3 <= r.amplitude_V <= 4e-3, r
    assert 0.4 <= period <= 1.0, period
    assert r.n_periods > 10  # many oscillations along the plateau, not one wiggle
    assert abs(r.plateau_voltage_V - 1.55) < 0.05


def test_lower_rate_gives_a_shorter_period_in_capacity(lto_oscillations):
    fast = lto_oscillations[("lto-thin-film", 0.1)].period_Ah
    slow = lto_oscillations[("lto-thin-film", 0.025)].period_Ah
    assert slow < 0.8 * fast


def test_azo60_redistribution_suppresses_oscillations(lto_oscillations):
    assert lto_oscillations[("lto-thin-film-azo60", 0.1)].amplitude_V < 0.5e-3
    assert (
        lto_oscillations[("lto-thin-film-azo60", 0.1)].amplitude_V
        < 0.3 * lto_oscillations[("lto-thin-film", 0.1)].amplitude_V
    )


def test_multirate_cv_peak_separation_rises_and_randles_sevcik_returns_the_model_D():
    cell = load_cell("lto-cv")
    p = cell.parameters.positive
    rates = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    separations, peaks = [], []
    for rate in rates:
        model = cell.build_model()
        sweep = SweepSettings(start_V=1.3, vertex_1_V=1.8, vertex_2_V=1.3, scan_rate_V_s=rate, step_V=0.001)
        e, i = [], []
        for potential in sweep.potentials_V():
            v, current = model.step(sweep.step_V / rate, "voltage", potential, 1.0)
            e.append(v - current * cell.parameters.series_resistance_ohm)  # iR-corrected, as SECCM analysis does
            i.append(current)
        e, i = np.array(e), np.array(i)
        separations.append(e[np.argmax(i)] - e[np.argmin(i)])
        peaks.append(i.max())
    assert all(b > a for a, b in zip(separations, separations[1:])), separations
    assert 0.055 < separations[0] < 0.075  # near-Nernstian at 10 mV/s (seed 001: 57 mV)
    # Randles-Sevcik: i_p = 0.4463 n F A C sqrt(n F v D / R T); A*C = Q / (F L) for a film
    slope = np.polyfit(np.sqrt(rates), peaks, 1)[0]
    area_conc = p.capacity_Ah * 3600 / FARADAY_C_per_mol / p.diffusion.length_m
    diffusivity = (slope / (0.4463 * FARADAY_C_per_mol * area_conc)) ** 2 * thermal_voltage_V(25.0)
    assert diffusivity == pytest.approx(p.diffusion.diffusivity_m2_s, rel=0.2)


def _first_cycle_ce(name: str) -> float:
    cell = load_cell(name)
    model = cell.build_model()
    _, q_in = galvanostatic(model, 0.1 * cell.nominal_capacity_Ah, 3.68, 60.0)
    _, q_out = galvanostatic(model, -0.1 * cell.nominal_capacity_Ah, 1.88, 60.0)
    return -q_out[-1] / q_in[-1]


def test_first_cycle_coulombic_efficiency_of_the_seed004_variants():
    assert _first_cycle_ce("lco-lgps-pristine") == pytest.approx(0.219, abs=0.05)
    assert _first_cycle_ce("lco-lgps-dual-shell") == pytest.approx(0.904, abs=0.05)
    assert _first_cycle_ce("lco-lgps-one-shell") == pytest.approx(0.891, abs=0.05)


def test_impedance_agrees_with_the_time_domain_response_to_a_small_sine():
    """The linearised impedance and a lock-in on the nonlinear time-domain model agree."""
    cell = load_cell("lco-lgps-ceramic")
    for frequency_Hz in (1.0, 0.05):
        model = cell.build_model()
        galvanostatic(model, 0.2 * cell.nominal_capacity_Ah, 3.5, 60.0)
        model.step(3600.0, "open_circuit")
        z_model = complex(model.impedance_ohm([frequency_Hz])[0])
        amplitude_A = 2e-6
        n_per_period, periods = 200, 6
        dt = 1.0 / frequency_Hz / n_per_period
        t = np.arange(n_per_period * periods) * dt + dt
        currents = amplitude_A * np.sin(2 * math.pi * frequency_Hz * (t - dt / 2))
        v = np.array([model.step(dt, "current", i, math.copysign(10.0, i))[0] for i in currents])
        last = slice(-n_per_period * 2, None)  # after the transient
        ref = np.exp(-2j * math.pi * frequency_Hz * t[last])
        v_last = v[last] - v[last].mean()
        z_time = 2 * np.mean(v_last * ref) / (amplitude_A * -1j)
        assert abs(z_time - z_model) / abs(z_model) < 0.05, (frequency_Hz, z_time, z_model)


def test_gitt_polarization_is_larger_on_bare_than_on_glassy_ceramic_lco():
    def polarization(name: str) -> float:
        cell = load_cell(name)
        model = cell.build_model()
        galvanostatic(model, 0.1 * cell.nominal_capacity_Ah, 3.68, 60.0)
        model.step(3600.0, "open_circuit")
        pol = []
        for _ in range(200):
            for _ in range(20):
                v_pulse, _ = model.step(60.0, "current", -0.1 * cell.nominal_capacity_Ah, 1.0)
            for _ in range(60):
                v_rest, _ = model.step(60.0, "open_circuit")
            pol.append(v_rest - v_pulse)
            if v_pulse <= 1.88:
                break
        return float(np.mean(pol))

    bare, glassy = polarization("lco-lgps-bare"), polarization("lco-lgps-glassy-ceramic")
    assert bare > 2 * glassy > 0


def test_lithium_on_copper_needs_a_nucleation_overpotential_and_loses_lithium_each_cycle():
    cell = load_cell("li-metal-cu")
    model = cell.build_model()
    plating = np.array([model.step(10.0, "current", -1e-3, -0.5)[0] for _ in range(360)])
    assert plating[:6].min() < plating[-1] - 0.03  # the dip before nuclei cover the copper
    stripping, q_out = galvanostatic(model, 1e-3, 0.5, 10.0, compliance_V=1.0)
    ce = q_out[-1] / 1e-3
    assert 0.9 < ce < 0.995


def test_a_soft_short_discharges_a_resting_cell():
    cell = load_cell("lco-lgps-glassy-ceramic")
    healthy, shorted = cell.build_model(), cell.build_model()
    for model in (healthy, shorted):
        galvanostatic(model, 0.2 * cell.nominal_capacity_Ah, 3.6, 60.0)
    shorted.inject(Fault(kind="soft_short", at_time_s=shorted.age_s, resistance_ohm=2000.0))
    for model in (healthy, shorted):
        model.step(3600.0, "open_circuit")
    assert shorted.voltage_V < healthy.voltage_V - 0.02


def test_contact_loss_raises_the_high_frequency_resistance():
    cell = load_cell("lco-lgps-ceramic")
    model = cell.build_model()
    before = model.impedance_ohm([1e6])[0].real
    model.inject(Fault(kind="contact_loss", at_time_s=0.0, resistance_ohm=25.0))
    assert model.impedance_ohm([1e6])[0].real == pytest.approx(before + 25.0, rel=1e-3)


def _cycle_to_eis(model, nominal_Ah: float, window_V, cycles: int, frequency_Hz: np.ndarray, rng, noise: float):
    """0.2C CC-CV charge / CC discharge for ``cycles``; EIS at the charged state (after 10 min rest) every 10th."""
    current_A = 0.2 * nominal_Ah
    lo, hi = window_V
    spectra = {}
    for cycle in range(1, cycles + 1):
        while abs(model.step(300.0, "current", current_A, hi)[1]) > 0.05 * current_A:
            pass
        if cycle % 10 == 0:
            model.step(600.0, "open_circuit")
            z = model.impedance_ohm(frequency_Hz)
            spectra[cycle] = z + noise * np.abs(z) * (rng.standard_normal(len(z)) + 1j * rng.standard_normal(len(z)))
        while abs(model.step(300.0, "current", -current_A, lo)[1]) > 0.05 * current_A:
            pass
    return spectra


def test_seed003_ceramic_charge_transfer_grows_and_glassy_ceramic_stays_flat_by_eis_fit():
    """Seed 003: ceramic R_ct 142.6 -> 234.9 ohm from cycle 10 to 50; glassy/ceramic barely rises.

    The resistances are recovered the way a lab would: a CNLS fit of the
    spectrum (R_SE, then the R_CI, R_AI and R_ct arcs ordered by time
    constant, then solid diffusion), on points with the cell file's noise.
    """
    from labtwin.analysis.eis import fit_circuit

    frequency_Hz = np.logspace(6, -1, 57)  # 1 MHz to 0.1 Hz, 8 points per decade as seed003-cycling-eis.yaml
    circuit = "R0-p(R1,C1)-p(R2,C2)-p(R3,C3)-W1"
    fitted = {}
    for name in ("lco-lgps-ceramic", "lco-lgps-glassy-ceramic"):
        cell = load_cell(name)
        spectra = _cycle_to_eis(
            cell.build_model(),
            cell.nominal_capacity_Ah,
            cell.voltage_window_V,
            50,
            frequency_Hz,
            np.random.default_rng(3),
            cell.impedance_noise_relative,
        )
        fitted[name] = {n: fit_circuit(circuit, frequency_Hz, spectra[n]) for n in (10, 50)}
    ceramic, glassy = fitted["lco-lgps-ceramic"], fitted["lco-lgps-glassy-ceramic"]
    for fit in (*ceramic.values(), *glassy.values()):
        assert fit.relative_rms < 0.01
    assert ceramic[10].parameters["R3"] == pytest.approx(142.6, rel=0.15)
    assert ceramic[50].parameters["R3"] == pytest.approx(234.9, rel=0.15)
    assert ceramic[10].parameters["R1"] == pytest.approx(196.5, rel=0.15)  # R_CI
    assert ceramic[50].parameters["R1"] == pytest.approx(269.5, rel=0.15)
    assert glassy[10].parameters["R3"] == pytest.approx(106.2, rel=0.15)
    assert glassy[10].parameters["R1"] == pytest.approx(102.2, rel=0.15)
    for name, growth in (("ceramic", ceramic), ("glassy", glassy)):
        rise = growth[50].parameters["R3"] / growth[10].parameters["R3"]
        assert (rise > 1.4) if name == "ceramic" else (rise < 1.1), (name, rise)
