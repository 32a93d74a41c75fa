"""CV analysis: peaks and separation per voltammogram, Randles-Sevcik D over the linear range of rates."""

from __future__ import annotations

import numpy as np
import pytest

from labtwin.analysis.cv import randles_sevcik, voltammogram
from labtwin.documents import SweepSettings
from labtwin.physics.library import load_cell


def _cv(rate: float):
    cell = load_cell("lto-cv")
    model = cell.build_model()
    sweep = SweepSettings(start_V=1.3, vertex_1_V=1.8, vertex_2_V=1.3, scan_rate_V_s=rate, step_V=0.001)
    e, i = [], []
    for potential in sweep.potentials_V():
        v, current = model.step(sweep.step_V / rate, "voltage", potential, 1.0)
        e.append(v - current * cell.parameters.series_resistance_ohm)
        i.append(current)
    return np.array(e), np.array(i), cell


def test_peaks_and_randles_sevcik_recover_the_film_diffusivity():
    rates = [0.01, 0.05, 0.2, 0.5]
    results = []
    for rate in rates:
        e, i, cell = _cv(rate)
        results.append(voltammogram(e, i, scan_rate=rate))
    separations = [r.peak_separation_V for r in results]
    assert all(b > a for a, b in zip(separations, separations[1:]))
    assert all(r.anodic.potential_V > 1.55 > r.cathodic.potential_V for r in results)
    film = cell.parameters.positive
    area_conc = film.capacity_Ah * 3600 / 96485.33212 / film.diffusion.length_m
    rs = randles_sevcik(rates, [r.anodic.current_A for r in results], area_conc)
    assert rs.diffusivity_m2_s == pytest.approx(film.diffusion.diffusivity_m2_s, rel=0.2)
    assert rs.rates_used == 4 and rs.r_squared > 0.99


def test_randles_sevcik_keeps_to_the_linear_range_of_slow_rates():
    rates = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
    peaks = 1e-6 * np.sqrt(rates)
    peaks[-2:] *= [0.7, 0.5]  # kinetics limit the fastest sweeps
    rs = randles_sevcik(rates, peaks, area_concentration_mol_per_m=1.0)
    assert rs.linear_range_V_s == (0.01, 0.5) and rs.rates_used == 6
    all_rates = np.polyfit(np.sqrt(rates), peaks, 1)[0]
    assert rs.slope_A_per_sqrt_V_s == pytest.approx(1e-6, rel=1e-6) and all_rates < 0.9e-6
