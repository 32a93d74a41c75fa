"""The one definition of cycles and their figures (labtwin.analysis.cycles), without a broker or Prefect:
the counter, the half-cell CE convention shared by the summary and the interpreter, charge from a sparse
record, a file that numbers no cycles, and a resumed step's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from labtwin.analysis.cycles import CycleCounter, charge_increments, coulombic_efficiency, number_steps
from labtwin.analysis.summary import summarize_run
from labtwin.data.replay import Recording, documents
from labtwin.documents import EndReason, StepEvent, StepKind, StepStats
from labtwin.protocols.compile import CompileContext, compile_program
from labtwin.protocols.model import parse_protocol
from labtwin.protocols.program import Interpreter


def test_a_cycle_opens_when_the_first_direction_returns_and_rests_or_spectra_open_none():
    # rest, discharge, rest, charge, eis, discharge, charge, discharge: an anode half cell's three cycles
    directions = [None, "discharge", None, "charge", None, "discharge", "charge", "discharge"]
    assert number_steps(directions) == [0, 1, 1, 1, 1, 2, 2, 3]
    # two charges in a row (CC then CV, or a formation top-up) stay in one cycle
    assert number_steps(["charge", "charge", "discharge", "charge"]) == [1, 1, 1, 2]
    counter = CycleCounter()
    assert counter.opens_cycle("charge") and counter.add("charge") == 1 and counter.first_direction == "charge"
    assert not counter.opens_cycle(None) and not counter.opens_cycle("charge")


def test_ce_is_the_second_direction_over_the_first():
    assert coulombic_efficiency(1.0, 0.9, "charge") == pytest.approx(0.9)  # cathode / full cell: out / in
    assert coulombic_efficiency(0.8, 1.0, "discharge") == pytest.approx(0.8)  # LTO|Li: delithiation / lithiation
    assert coulombic_efficiency(1.0, 0.0, "charge") is None and coulombic_efficiency(1.0, 1.0, None) is None


ANODE = """
metadata: {name: anode half cell, chemistry: LTO|Li, nominal_capacity_Ah: 1.0}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
stop_when: {coulombic_efficiency_below: 0.9}
method:
  - rest: {duration_s: 60}
  - repeat: 3
    steps:
      - cc: {c_rate: -1, until: {voltage_V: 1.0}}
      - cc: {c_rate: 1, until: {voltage_V: 2.5}}
"""


def _ended(cmd, charge_Ah: float, discharge_Ah: float) -> StepEvent:
    return StepEvent(
        run_id="r",
        channel="c",
        step_index=cmd.step_index,
        label=cmd.label,
        cycle=cmd.cycle,
        step=cmd.step,
        event="ended",
        time_s=float(cmd.step_index),
        reason=EndReason(kind="end_condition", name="voltage_V"),
        stats=StepStats(charge_Ah=charge_Ah, discharge_Ah=discharge_Ah, end_voltage_V=2.0),
    )


def test_stop_when_ce_fires_on_an_anode_half_cell_with_the_summarys_ce():
    """Discharge 1.0, charge 0.8: the summary says 0.80, and so must the interpreter (it said 1.25 and ran on)."""
    program = compile_program(parse_protocol(yaml.safe_load(ANODE)), CompileContext("r", 1.0))
    interp = Interpreter(program)
    events = []
    while (cmd := interp.next_command()) is not None:
        current = cmd.current_A or 0.0
        ev = _ended(cmd, 0.8 if current > 0 else 0.0, 1.0 if current < 0 else 0.0)
        events.append(ev)
        interp.record(ev)
    assert [e.cycle for e in events] == [0, 1, 1]  # the second cycle never starts
    assert "stop_when met after cycle 1" in interp.stop_reason and "CE 80.00 %" in interp.stop_reason
    summary = summarize_run("r", "c", events)
    assert [(c.cycle, c.coulombic_efficiency) for c in summary.cycles] == [(1, pytest.approx(0.8))]
    assert interp.figures(1) == summary.cycles[0]


def test_a_cycle_opens_before_the_step_that_starts_it_so_stop_when_acts_before_it_runs():
    """A loop that does not line up with the cycles (a first charge, then discharge + charge): the cycle
    that completes inside an iteration is the one the loop condition and stop_when read."""
    text = """
metadata: {name: shifted, nominal_capacity_Ah: 1.0}
record: {interval_s: 10}
safety: {voltage_min_V: 2.0, voltage_max_V: 4.3}
method:
  - cc: {c_rate: 1, until: {voltage_V: 4.2}}
  - loop: {until: {coulombic_efficiency_below: 0.95}, max_cycles: 10}
    steps:
      - cc: {c_rate: -1, until: {voltage_V: 3.0}}
      - cccv: {c_rate: 1, voltage_V: 4.2, until: {c_rate: 0.05}}
      - cv: {voltage_V: 4.2, until: {c_rate: 0.01, time_s: 600}}
"""
    interp = Interpreter(compile_program(parse_protocol(yaml.safe_load(text)), CompileContext("r", 1.0)))
    returned = iter([0.99, 0.98, 0.90, 0.99, 0.99])
    order = []
    while (cmd := interp.next_command()) is not None:
        order.append((cmd.step.value, cmd.cycle, cmd.repetition))
        if cmd.step is StepKind.cc and (cmd.current_A or 0) < 0:
            interp.record(_ended(cmd, 0.0, next(returned)))
        else:
            interp.record(_ended(cmd, 1.0 if cmd.step is not StepKind.cv else 0.0, 0.0))
    # each charge after a discharge opens a cycle; the CV hold goes on charging in the cycle its CCCV opened
    assert [c for _, c, _ in order] == [1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    assert [r for _, _, r in order] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # cycle 3 (the charge of iteration 2, the 0.90 discharge of iteration 3) ends the loop after iteration 3
    assert order[-1] == ("cv", 4, 3) and not interp.stop_reason


def _recording(time_s, current_A, step, capacity_Ah=None, cycle=None) -> Recording:
    n = len(time_s)
    q = (
        np.asarray(capacity_Ah, float)
        if capacity_Ah is not None
        else np.cumsum(charge_increments(np.asarray(time_s, float), np.asarray(current_A, float), np.asarray(step)))
    )
    return Recording(
        name="file",
        time_s=np.asarray(time_s, float),
        voltage_V=np.linspace(3.0, 3.5, n),
        current_A=np.asarray(current_A, float),
        capacity_Ah=q,
        temperature_C=np.full(n, 25.0),
        step=np.asarray(step, int),
        cycle=np.asarray(cycle, int) if cycle is not None else np.zeros(n, int),
        frequency_Hz=np.full(n, np.nan),
        z_real_ohm=np.full(n, np.nan),
        z_imag_ohm=np.full(n, np.nan),
        source_format="test",
        has_cycle=cycle is not None,
    )


def test_a_sparse_record_gives_the_charge_the_agent_counted_from_its_net_charge_column():
    """The agent reads every second and records every tenth reading: its net charge column holds what it
    counted, and the step's charge read from the file is that, not an integral of the recorded currents."""
    t_read = np.arange(1.0, 601.0)
    i_read = np.where(t_read <= 300, 1e-3, -1e-3 * np.exp(-(t_read - 300) / 100))  # a charge, then a decaying hold
    step_read = np.where(t_read <= 300, 0, 1)
    q_read = np.cumsum(charge_increments(t_read, i_read, step_read))
    agent_charge = np.sum(np.clip(np.diff(q_read[:300], prepend=0.0), 0, None))
    agent_discharge = -(q_read[-1] - q_read[299])
    kept = np.r_[np.arange(0, 300, 10), 299, np.arange(300, 600, 10), 599]
    rec = _recording(t_read[kept], i_read[kept], step_read[kept], capacity_Ah=q_read[kept])
    ended = [d for d in documents(rec, lab="l", channel="c", cell_id="x") if isinstance(d, StepEvent) and d.stats]
    ended = [e for e in ended if e.event == "ended"]
    assert ended[0].stats.charge_Ah == pytest.approx(agent_charge, rel=1e-12)
    assert ended[1].stats.discharge_Ah == pytest.approx(agent_discharge, rel=1e-12)
    integrated = np.sum(np.clip(i_read[kept][kept >= 300], None, 0) * 10.0) / 3600.0  # what a rectangle rule gives
    assert abs(-integrated - agent_discharge) > 1e-3 * agent_discharge  # the difference the column removes


def test_a_file_without_cycles_is_numbered_by_the_same_counter():
    t = np.arange(0.0, 80.0)
    current = np.concatenate([np.zeros(10), -np.ones(20), np.ones(20), np.zeros(10), -np.ones(20)]) * 1e-3
    step = np.concatenate([np.zeros(10), np.ones(20), np.full(20, 2), np.full(10, 3), np.full(20, 4)])
    rec = _recording(t, current, step)
    docs = list(documents(rec, lab="l", channel="c", cell_id="x"))
    ended = [d for d in docs if isinstance(d, StepEvent) and d.event == "ended"]
    assert [e.cycle for e in ended] == [0, 1, 1, 1, 2]
    assert rec.cycle.tolist() == [0] * 10 + [1] * 50 + [2] * 20  # the samples carry it too
    kept = _recording(t, current, step, cycle=np.full(80, 7))  # a file's own cycle column is kept
    assert {e.cycle for e in documents(kept, lab="l", channel="c", cell_id="x") if isinstance(e, StepEvent)} == {7}


def test_a_resumed_step_counts_the_charge_before_the_crash():
    before = StepStats(duration_s=100.0, charge_Ah=1e-4, energy_in_Wh=3e-4, start_voltage_V=3.0, n_samples=10)
    after = StepStats(duration_s=50.0, charge_Ah=5e-5, energy_in_Wh=1.7e-4, end_voltage_V=3.6, n_samples=6, last_seq=9)
    whole = before.continued_by(after)
    assert whole.charge_Ah == pytest.approx(1.5e-4) and whole.energy_in_Wh == pytest.approx(4.7e-4)
    assert (whole.duration_s, whole.n_samples, whole.start_voltage_V, whole.end_voltage_V, whole.last_seq) == (
        150.0,
        16,
        3.0,
        3.6,
        9,
    )
