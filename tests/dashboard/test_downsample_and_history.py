"""What the run page is sent: extremes kept when a long run is downsampled, and figures from the one owner."""

from __future__ import annotations

import numpy as np

from labtwin.analysis.curves import cycle_charge_Ah, half_cycle_rows
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


def test_the_run_pages_curves_count_charge_by_the_agents_rule_checked_by_hand():
    """V-Q per cycle and dQ/dV's half cycles (labtwin.analysis.curves, shared with the CLI's PNGs)."""
    from labtwin.documents import StepEvent, StepKind, StepStats

    # Discharge 1 mA for 3600 s (step 1), rest (step 2), charge 1 mA from t = 5410 s (step 3): one cycle.
    t = np.arange(0.0, 7300.0, 10.0)
    i = np.where(t < 3600, -1e-3, np.where(t < 5410, 0.0, 1e-3))
    step = np.where(t < 3600, 1, np.where(t < 5400, 2, 3))
    v = np.where(t < 3600, 1.6 - t * 1e-4, 1.2 + (t - 5400) * 1e-4)
    samples = {"time_s": t, "current_A": i, "voltage_V": v, "step": step, "cycle": np.ones_like(step)}
    per_cycle = cycle_charge_Ah(samples)
    rows, q = per_cycle[1]
    assert list(per_cycle) == [1] and len(rows) == len(t)
    # By hand, the agent's rule: 359 intervals of 10 s at -1 mA; the rest moves nothing; in step 3 the first
    # reading counts i*dt from the step's start (0 A), then the half interval onto 1 mA and 188 full ones.
    assert abs(q[359] - (-3590e-3 / 3600)) < 1e-12
    assert abs(q[-1] - (-3590e-3 + 5e-3 + 1880e-3) / 3600) < 1e-12

    def ended(k: int, kind: StepKind, charge: float, discharge: float) -> StepEvent:
        return StepEvent(
            run_id="r",
            channel="c",
            step_index=k,
            cycle=1,
            step=kind,
            event="ended",
            time_s=0.0,
            stats=StepStats(charge_Ah=charge, discharge_Ah=discharge),
        )

    events = [ended(1, StepKind.cc, 0.0, 1e-3), ended(2, StepKind.rest, 0.0, 0.0), ended(3, StepKind.cc, 5e-4, 0.0)]
    halves = half_cycle_rows(samples, events)
    assert [(c, d) for c, d, _ in halves] == [(1, "charge"), (1, "discharge")]  # sorted by (cycle, direction)
    assert set(halves[1][2]) == set(np.nonzero(step == 1)[0]) and set(halves[0][2]) == set(np.nonzero(step == 3)[0])


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
