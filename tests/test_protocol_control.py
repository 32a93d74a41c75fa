"""Control flow of the protocol language: then-actions (next, goto, stop, pause), loops until a cycle condition,
groups, experiment-level stop_when, dV/dt ends; and replay, which is how a resumed run finds its place."""

from __future__ import annotations

import math

import pytest
import yaml

from labtwin.agent.safety import VoltageSlope, check_end
from labtwin.documents import EndConditions, EndReason, StepEvent, StepKind, StepStats
from labtwin.protocols.compile import CompileContext, compile_program, compile_protocol
from labtwin.protocols.model import ProtocolError, parse_protocol
from labtwin.protocols.program import Interpreter, ResumeMismatch

HEAD = """
metadata: {name: control, nominal_capacity_Ah: 1.0e-3}
record: {interval_s: 10}
safety: {voltage_min_V: 2.0, voltage_max_V: 4.3}
"""


def program(text: str):
    return compile_program(parse_protocol(yaml.safe_load(HEAD + text)), CompileContext("r", 1.0e-3))


def ended(cmd, condition: str = "voltage_V", charge_Ah: float = 0.0, discharge_Ah: float = 0.0) -> StepEvent:
    return StepEvent(
        run_id="r",
        channel="ch",
        step_index=cmd.step_index,
        label=cmd.label,
        cycle=cmd.cycle,
        step=cmd.step,
        event="ended",
        time_s=0.0,
        reason=EndReason(kind="end_condition", name=condition),
        stats=StepStats(charge_Ah=charge_Ah, discharge_Ah=discharge_Ah),
    )


def run(interp: Interpreter, outcome) -> list[tuple[int, str, int]]:
    """Drive the interpreter to the end; ``outcome(cmd)`` says how each step ends (condition, charge, discharge)."""
    order = []
    while (cmd := interp.next_command()) is not None:
        order.append((cmd.step_index, cmd.label, cmd.cycle))
        condition, charge, discharge = outcome(cmd)
        if interp.record(ended(cmd, condition, charge, discharge)).action == "stop":
            break
    return order


def test_a_program_without_control_runs_its_compiled_steps_in_order():
    text = """
method:
  - rest: {duration_s: 60}
  - repeat: 2
    steps: ["Charge at C/2 until 4.2 V", "Discharge at C/2 until 3.0 V"]
"""
    prog = program(text)
    assert prog.is_static
    order = run(Interpreter(prog), lambda cmd: ("voltage_V" if cmd.step.value == "cc" else "time_s", 0, 0))
    assert (
        [(i, c) for i, _, c in order]
        == [(s.step_index, s.repetition) for s in prog.steps]
        == [(0, 0), (1, 1), (2, 1), (3, 2), (4, 2)]
    )


def test_then_goto_skips_ahead_stop_ends_the_run_and_pause_is_reported():
    text = """
method:
  - cc: {c_rate: -5, until: {voltage_V: 2.5, time_s: 60}, then: {time_s: goto gentle, voltage_V: next}}
  - cc: {c_rate: -2, until: {voltage_V: 2.5}, label: fast}
  - cc: {c_rate: -0.5, until: {voltage_V: 2.5}, tag: gentle, label: gentle, then: {voltage_V: pause}}
  - rest: {duration_s: 600, label: relax, then: {time_s: stop}}
  - cc: {c_rate: 1, until: {voltage_V: 4.2}, label: never}
"""
    interp = Interpreter(program(text))
    first = interp.next_command()
    assert interp.record(ended(first, "time_s")).action == "next"  # 60 s passed before 2.5 V: goto gentle
    gentle = interp.next_command()
    assert gentle.label == "gentle" and gentle.step_index == 1  # execution count, not program position
    decision = interp.record(ended(gentle, "voltage_V"))
    assert decision.action == "pause" and "gentle" in decision.reason
    relax = interp.next_command()
    assert relax.label == "relax"
    decision = interp.record(ended(relax, "time_s"))
    assert decision.action == "stop" and interp.next_command() is None and "then stop" in interp.stop_reason


def test_a_loop_repeats_until_capacity_fades_below_a_fraction_of_the_first_cycle():
    text = """
method:
  - rest: {duration_s: 60}
  - loop: {until: {discharge_capacity_fraction_below: 0.8}, max_cycles: 100}
    steps:
      - Charge at 1C until 4.2 V
      - Discharge at 1C until 3.0 V
  - eis: {f_start_Hz: 1000, f_end_Hz: 1}
"""
    capacities = iter([1.0e-3, 0.95e-3, 0.9e-3, 0.85e-3, 0.79e-3, 0.7e-3])

    def outcome(cmd):
        if cmd.step.value == "cc" and cmd.current_A < 0:
            return "voltage_V", 0.0, next(capacities)
        return ("voltage_V", 1e-3, 0.0) if cmd.step.value == "cc" else ("time_s", 0.0, 0.0)

    order = run(Interpreter(program(text)), outcome)
    cycles = [c for _, label, c in order if "ischarge" in label]
    assert cycles == [1, 2, 3, 4, 5]  # the fifth cycle's 79 % ends the loop
    assert order[-1][1].startswith("EIS")  # and the program goes on after it


def test_a_loop_stops_at_max_cycles_and_stop_when_ends_the_whole_run():
    text = """
stop_when: {coulombic_efficiency_below: 0.9}
method:
  - loop: {until: {discharge_capacity_Ah_below: 1.0e-9}, max_cycles: 3}
    steps: ["Charge at 1C until 4.2 V", "Discharge at 1C until 3.0 V"]
  - loop: {until: {discharge_capacity_Ah_below: 1.0e-9}, max_cycles: 10}
    steps: ["Charge at 1C until 4.2 V", "Discharge at 1C until 3.0 V"]
"""
    ce = iter([0.99, 0.99, 0.99, 0.98, 0.85, 0.99])

    def outcome(cmd):
        return ("voltage_V", 1e-3, 0.0) if cmd.current_A > 0 else ("voltage_V", 0.0, 1e-3 * next(ce))

    interp = Interpreter(program(text))
    order = run(interp, outcome)
    assert [c for _, _, c in order] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # 3 cycles, then the second loop numbers on
    assert "stop_when met after cycle 5" in interp.stop_reason and "CE 85.00 %" in interp.stop_reason


def test_replay_of_stored_steps_stands_the_interpreter_on_the_interrupted_step():
    text = """
method:
  - loop: {until: {discharge_capacity_fraction_below: 0.5}, max_cycles: 10}
    steps: ["Charge at 1C until 4.2 V", "Discharge at 1C until 3.0 V"]
"""
    live = Interpreter(program(text))
    events = []
    for _ in range(5):  # two and a half cycles happened before the crash
        cmd = live.next_command()
        events.append(ended(cmd, "voltage_V", 1e-3 if cmd.current_A > 0 else 0, 1e-3 if cmd.current_A < 0 else 0))
        live.record(events[-1])
    resumed = Interpreter(program(text))
    resumed.replay(events)
    assert resumed.next_command() == live.next_command()
    other = Interpreter(program(text.replace("4.2 V", "4.1 V")))
    with pytest.raises(ResumeMismatch, match="protocol file changed"):
        other.replay(events)


@pytest.mark.parametrize(
    "method, message",
    [
        (
            "[{cc: {c_rate: 1, until: {voltage_V: 4.2, time_s: 60}, then: {time_s: goto nowhere}}}]",
            "no step, loop or group has that tag",
        ),
        ("[{repeat: 2, steps: [{rest: {duration_s: 60, tag: a}}]}]", "inside a repeat"),
        ("[{rest: {duration_s: 60, tag: a}}, {rest: {duration_s: 60, tag: a}}]", "used twice"),
        (
            "[{cc: {c_rate: 1, until: {time_s: 60}, then: {voltage_V: stop}}}]",
            "then names voltage_V, which is not among",
        ),
        ("[{cc: {c_rate: 1, until: {time_s: 60}, then: {time_s: jump}}}]", "then.time_s"),
        (
            "[{rest: {duration_s: 60, then: {time_s: goto inner}}}, {loop: {until: {cycles: 2}, max_cycles: 2}, "
            "steps: [{rest: {duration_s: 60, tag: inner}}]}]",
            "jumps into a loop",
        ),
        ("[{loop: {until: {}, max_cycles: 2}, steps: [{rest: {duration_s: 60}}]}]", "give at least one of"),
    ],
)
def test_control_mistakes_are_refused_before_anything_runs(method, message):
    with pytest.raises(ProtocolError, match=message):
        program(f"method: {method}\n")


def test_a_group_is_a_goto_target_and_shows_its_steps_once():
    text = """
method:
  - group: checkup
    steps: [{rest: {duration_s: 600}}, {eis: {f_start_Hz: 1000, f_end_Hz: 1}}]
  - cc: {c_rate: -1, until: {voltage_V: 3.0, time_s: 600}, then: {time_s: goto checkup}}
"""
    prog = program(text)
    assert (
        prog.tags == {"checkup": 0}
        and len(compile_protocol(parse_protocol(yaml.safe_load(HEAD + text)), CompileContext("r", 1e-3))) == 3
    )
    interp = Interpreter(prog)
    labels = []
    for condition in ("time_s", "time_s", "time_s", "time_s", "time_s", "voltage_V"):
        cmd = interp.next_command()
        labels.append(cmd.label.split()[0])
        interp.record(ended(cmd, condition))
    assert labels == ["rest", "EIS", "discharge", "rest", "EIS", "discharge"]


def test_dvdt_ends_a_rest_once_the_cell_has_relaxed():
    slope = VoltageSlope(10)
    end = EndConditions(time_s=7200, dvdt_V_per_h=0.005)
    reasons = []
    for k in range(400):  # an exponential relaxation with a 10 min time constant, 10 s samples, 20 uV noise
        t = 10.0 * k

        v = 3.9 - 0.05 * math.exp(-t / 600) + 2e-5 * ((-1) ** k)
        reasons.append(check_end(StepKind.rest, end, None, v, 0.0, t, 0.0, slope.add(t, v)))
    first = next(k for k, r in enumerate(reasons) if r is not None)
    assert reasons[first].name == "dvdt_V_per_h"
    # |dV/dt| = 0.05 / 600 s * exp(-t/600) * 3600 = 0.3 V/h * exp(-t/600) drops below 5 mV/h near t = 2460 s
    # (the 10-sample line lags by ~45 s); never before the window is full.
    assert 2300 < 10.0 * first < 2700
