"""The Battery Data Alliance's own reference BDF file (a Maccor rate test of an LG INR21700-M50, machine-readable
keys, CC-BY-4.0) read by labtwin: rows, columns, units, the unsigned current signed, and per-cycle figures
against the file's own capacity counter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

from labtwin.analysis.cycles import summarize_cycles
from labtwin.data.replay import documents
from labtwin.documents import StepEvent
from labtwin.formats import read_recording

FILE = Path(__file__).parent / "bdf" / "faraday__lg-INR21700M50-2019-002__2019-06-02__rate__25degC__maccor.bdf.csv"
CHARGE_END_V, DISCHARGE_END_V = 4.2, 2.5  # the rate test's CC-CV charge and its discharge cut-off


def _raw() -> dict[str, np.ndarray]:
    table = pacsv.read_csv(FILE)
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _reference() -> dict[int, tuple[float, float]]:
    """Per cycle from the file's own counter: ``step_cumulative_capacity_ah`` runs on through a charge's CC and CV
    steps (it restarts when the direction changes), so a charge is its value at the end of the last step that
    ended at the charge voltage, a discharge its value at the end of the step that ended at the cut-off. The
    direction is read from where each step ended, not from the current (the file writes its magnitude)."""
    raw = _raw()
    cycle, step, q, v = raw["cycle_count"], raw["step_count"], raw["step_cumulative_capacity_ah"], raw["voltage_volt"]
    out: dict[int, list[float]] = {}
    steps = list(np.unique(step))
    for k, s in enumerate(steps):
        rows = step == s
        c = int(cycle[rows][0])
        figures = out.setdefault(c, [0.0, 0.0])
        end_V = float(v[rows][-1])
        next_ends_charged = k + 1 < len(steps) and abs(float(v[step == steps[k + 1]][-1]) - CHARGE_END_V) < 0.01
        if abs(end_V - CHARGE_END_V) < 0.01 and not (next_ends_charged and q[step == steps[k + 1]].max() > 0):
            figures[0] += float(q[rows][-1])
        elif abs(end_V - DISCHARGE_END_V) < 0.01:
            figures[1] += float(q[rows][-1])
    return {c: (f[0], f[1]) for c, f in out.items()}


def test_the_reference_file_reads_with_its_units_and_its_current_signed():
    raw = _raw()
    rec = read_recording(FILE)
    assert rec.source_format == "bdf" and len(rec) == 6313
    np.testing.assert_array_equal(rec.time_s, raw["test_time_second"])
    np.testing.assert_array_equal(rec.voltage_V, raw["voltage_volt"])
    np.testing.assert_array_equal(np.abs(rec.current_A), raw["current_ampere"])
    np.testing.assert_array_equal(rec.temperature_C, raw["ambient_temperature_celsius"])
    assert (raw["current_ampere"] >= 0).all()  # the file writes the magnitude
    discharging = (rec.current_A < 0) & (np.gradient(rec.voltage_V) < 0)
    assert discharging.sum() > 1500  # and labtwin signs the discharges
    assert any("never negative" in note for note in rec.notes)
    assert rec.unix_start_s == pytest.approx(raw["unix_time_second"][0] - raw["test_time_second"][0])


def test_per_cycle_figures_agree_with_the_files_own_counter():
    rec = read_recording(FILE)
    events = [d for d in documents(rec, lab="l", channel="c", cell_id="m50", run_id="r") if isinstance(d, StepEvent)]
    cycles = summarize_cycles(events)
    reference = _reference()
    assert [c.cycle for c in cycles] == sorted(reference) == [1, 2, 3, 4, 5]
    for c in cycles:
        charge, discharge = reference[c.cycle]
        # labtwin integrates the current (the file has no net-capacity column); the counter is the cycler's own
        assert c.charge_Ah == pytest.approx(charge, rel=2e-4, abs=1e-6), c.cycle
        assert c.discharge_Ah == pytest.approx(discharge, rel=2e-4, abs=1e-6), c.cycle
    # A full cell that opens with a 2 % discharge from rest: CE is discharge / charge, per the file's cycles
    full = [c for c in cycles if c.cycle in (2, 3, 4)]
    assert all(c.first_direction == "charge" for c in cycles)
    for c in full:
        charge, discharge = reference[c.cycle]
        assert c.coulombic_efficiency == pytest.approx(discharge / charge, rel=3e-4)
        assert 0.99 < c.coulombic_efficiency < 1.0
