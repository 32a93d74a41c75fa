"""What the run page is sent: extremes kept when a long run is downsampled, and figures from the one owner."""

from __future__ import annotations

import numpy as np

from labtwin.analysis.curves import half_cycles
from labtwin.dashboard.downsample import downsample, extremes_indices


def test_a_millivolt_ripple_and_a_single_spike_survive_downsampling_a_million_samples():
    n = 1_000_000
    t = np.arange(n, dtype=float)
    rng = np.random.default_rng(3)
    # A 1.55 V plateau with a 2.5 mV oscillation (period 4 000 samples), one 50 mV spike, noise of 0.1 mV.
    v = 1.55 + 1.25e-3 * np.sin(2 * np.pi * t / 4000) + rng.normal(0, 1e-4, n)
    v[612_345] += 0.05
    keep = extremes_indices(v, 500)
    assert len(keep) <= 4 * 500 and np.all(np.diff(keep) > 0)
    assert 612_345 in keep  # the spike is drawn
    assert keep[0] == 0 and keep[-1] == n - 1
    kept = v[keep]
    assert kept.max() == v.max() and kept.min() == v.min()
    # Zoomed to one oscillation period (what the page asks the server for), the ripple is all there.
    window = slice(200_000, 204_000)
    zoomed = v[window][extremes_indices(v[window], 500)]
    assert np.ptp(zoomed) == np.ptp(v[window]) > 2.4e-3


def test_nan_readings_are_never_chosen_as_extremes_and_short_series_pass_whole():
    v = np.array([1.0, np.nan, 3.0, 2.0] * 1000)
    keep = extremes_indices(v, 10)
    assert np.nanmax(v[keep]) == 3.0 and np.nanmin(v[keep]) == 1.0
    assert list(extremes_indices(np.arange(7.0), 10)) == list(range(7))
    both = downsample({"v": np.arange(100.0), "i": -np.arange(100.0)}, "v", 5, also=("i",))
    assert 0 in both and 99 in both


def test_half_cycles_count_capacity_from_each_half_cycle_start_by_the_agents_charge_rule():
    # Discharge 1 mA for 3600 s, rest, charge 1 mA for 1800 s: cycle 1 of an anode half cell.
    t = np.arange(0.0, 7300.0, 10.0)
    i = np.where(t < 3600, -1e-3, np.where(t < 5400, 0.0, 1e-3))
    i[(t >= 5400) & (t < 5410)] = 0.0
    step = np.where(t < 3600, 1, np.where(t < 5400, 2, 3))
    samples = {
        "time_s": t,
        "current_A": i,
        "voltage_V": 1.5 + 0 * t,
        "step": step,
        "cycle": np.ones_like(step),
    }
    halves = half_cycles(samples)
    assert [(h.cycle, h.direction) for h in halves] == [(1, "discharge"), (1, "charge")]
    # The rest belongs to the discharge (it moves no charge); each half counts from zero. By hand, the agent's
    # rule: 359 intervals of 10 s at 1 mA in the discharge; in the charge, the half interval onto 1 mA
    # (trapezoid, 5 mA s) and then 188 full ones.
    assert abs(halves[0].capacity_Ah[-1] - 3590e-3 / 3600) < 1e-12
    assert abs(halves[1].capacity_Ah[-1] - (5e-3 + 1880e-3) / 3600) < 1e-12
    # A half cycle begins with its first sample that moved charge: the charge passed by then.
    assert abs(halves[0].capacity_Ah[0] - 10e-3 / 3600) < 1e-15 and abs(halves[1].capacity_Ah[0] - 5e-3 / 3600) < 1e-15


def test_a_cycle_cut_short_has_no_retention_or_ce_on_the_run_page(tmp_path):
    """A run stopped mid-cycle: its last cycle went one way only, so it shows no retention (not 0 %)."""
    from labtwin.dashboard.history import cycles
    from labtwin.data.store import Store
    from labtwin.documents import RunStart, StepEvent, StepKind, StepStats

    store = Store.open(tmp_path / "s.db")
    q = 1e-3

    def ended(i: int, cycle: int, charge: float, discharge: float) -> StepEvent:
        stats = StepStats(charge_Ah=charge, discharge_Ah=discharge, n_samples=10)
        return StepEvent(
            run_id="r",
            channel="c",
            step_index=i,
            cycle=cycle,
            step=StepKind.cc,
            event="ended",
            time_s=i * 100.0,
            stats=stats,
        )

    store.write(
        [
            RunStart(run_id="r", lab="l", channel="c", cell_id="cell", protocol="p", n_steps=3),
            ended(0, 1, q, 0.0),
            ended(1, 1, 0.0, 0.98 * q),
            ended(2, 2, 0.5 * q, 0.0),  # stopped here
        ]
    )
    table = cycles(store, "r")["cycles"]
    store.close()
    assert [c["cycle"] for c in table] == [1, 2]
    assert abs(table[0]["coulombic_efficiency"] - 0.98) < 1e-12 and table[0]["retention"] == 1.0
    assert table[1]["coulombic_efficiency"] is None and table[1]["retention"] is None
