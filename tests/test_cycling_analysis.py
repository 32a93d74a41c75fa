"""dQ/dV finds a two-phase plateau where it is; the cycling command summarises a recording."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from labtwin.analysis.cycling import differential_capacity, savgol_derivative, savgol_derivative_reference
from labtwin.cli import app


def test_dq_dv_peaks_at_the_plateau_voltage():
    q = np.linspace(0, 1e-3, 2000)
    # LFP-like: a plateau at 3.42 V between sloped ends, with 0.5 mV noise
    v = (
        3.42
        + 0.3 * np.arctanh(np.clip(2 * q / 1e-3 - 1, -0.999, 0.999)) / 10
        + 5e-4 * np.random.default_rng(0).standard_normal(len(q))
    )
    dqdv = differential_capacity(v, q)
    assert dqdv.voltage_V[np.argmax(dqdv.dq_dv_Ah_per_V)] == pytest.approx(3.42, abs=0.01)


@pytest.mark.parametrize("points", [12, 200, 400])
def test_the_savgol_matrix_is_scipys_filter(points):
    """The matrix form of the derivative equals scipy's savgol_filter, edges included, on a curve with a knee."""
    x = np.linspace(0.0, 1.0, points)
    q = np.tanh(8 * (x - 0.6)) + 0.01 * np.random.default_rng(points).standard_normal(points)
    spacing = x[1] - x[0]
    ours, scipys = savgol_derivative(q, spacing), savgol_derivative_reference(q, spacing)
    assert np.max(np.abs(ours - scipys)) <= 1e-9 * np.max(np.abs(scipys))


def test_analyze_cycling_of_a_recording(tmp_path):
    t = np.arange(0, 7200.0, 10.0)
    current = np.where(t < 3600, 1e-3, -1e-3)
    charge = np.cumsum(current * 10.0) / 3600.0
    voltage = 3.5 + 0.5 * np.where(t < 3600, charge / 1e-3, charge / 1e-3) + np.where(t < 3600, 0.05, -0.05)
    rows = ["time_s,voltage_V,current_A,capacity_Ah,step,cycle"] + [
        f"{a},{b},{c},{d},{0 if a < 3600 else 1},1" for a, b, c, d in zip(t, voltage, current, charge)
    ]
    path = tmp_path / "samples.csv"
    path.write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(app, ["analyze", "cycling", str(path), "--json", "--plot", str(tmp_path / "dqdv.png")])
    assert result.exit_code == 0, result.output
    (cycle,) = json.loads(result.output)["cycles"]
    assert cycle["charge_Ah"] == pytest.approx(1e-3, rel=0.01) and cycle["coulombic_efficiency"] == pytest.approx(
        1.0, rel=0.01
    )
    assert cycle["mean_polarization_V"] == pytest.approx(0.1, abs=0.01)
    assert (tmp_path / "dqdv.png").exists()
