"""The protocol language: library files load, bad files say what is wrong, compiling checks limits."""

from pathlib import Path

import pytest

from labtwin.documents import Limits, StepKind
from labtwin.protocols.compile import CompileContext, compile_protocol
from labtwin.protocols.model import LIBRARY, ProtocolError, load_protocol, parse_protocol

GOOD = {
    "metadata": {"name": "t"},
    "record": {"interval_s": 1},
    "safety": {"voltage_min_V": 1.0, "voltage_max_V": 3.0},
    "method": [
        {"rest": {"duration_s": 10}},
        {
            "repeat": 2,
            "steps": [
                {"cc": {"c_rate": -1.0, "until": {"voltage_V": 1.2}}},
                {"cc": {"current_A": 0.001, "until": {"voltage_V": 2.5, "time_s": 100}}},
                {"cv": {"voltage_V": 2.5, "until": {"c_rate": 0.05, "time_s": 60}}},
            ],
        },
    ],
}


@pytest.mark.parametrize("path", sorted(LIBRARY.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_library_protocol_loads_and_compiles(path: Path):
    proto = load_protocol(path)
    commands = compile_protocol(proto, CompileContext("r", nominal_capacity_Ah=1e-3))
    assert commands and all(c.time_budget_s() > 0 for c in commands)


def test_repeat_expands_into_numbered_cycles():
    commands = compile_protocol(parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002))
    assert [c.repetition for c in commands] == [0, 1, 1, 1, 2, 2, 2]  # the loop counter, not the cycle
    assert [c.step for c in commands[:4]] == [StepKind.rest, StepKind.cc, StepKind.cc, StepKind.cv]
    assert [c.step_index for c in commands] == list(range(7))


def test_c_rate_resolves_against_nominal_capacity_with_discharge_negative():
    commands = compile_protocol(parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002))
    assert commands[1].current_A == pytest.approx(-0.002)
    assert commands[3].end.current_A == pytest.approx(0.0001)


def test_cc_without_time_gets_a_step_time_limit_from_its_charge():
    commands = compile_protocol(parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002))
    assert commands[1].limits.step_time_max_s == pytest.approx(1.5 * 3600)


def test_malformed_protocol_error_names_file_field_and_value():
    bad = {**GOOD, "method": [{"cc": {"c_rate": "fast", "until": {"voltage_V": 1.2}}}]}
    with pytest.raises(ProtocolError) as info:
        parse_protocol(bad, "my.yaml")
    text = str(info.value)
    assert "my.yaml" in text and "method[0].cc.c_rate" in text and "'fast'" in text


def test_malformed_yaml_file_is_reported_with_its_path(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("metadata: {name: x\nmethod: [")
    with pytest.raises(ProtocolError, match="broken.yaml: not valid YAML"):
        load_protocol(f)


def test_unknown_field_is_refused_not_ignored():
    bad = {**GOOD, "method": [{"rest": {"duration_s": 10, "durtion_s": 5}}]}
    with pytest.raises(ProtocolError, match=r"method\[0\]\.rest\.durtion_s"):
        parse_protocol(bad)


def test_protocol_without_voltage_window_is_refused():
    bad = {**GOOD, "safety": {"voltage_max_V": 3.0}}
    with pytest.raises(ProtocolError, match="voltage_min_V and voltage_max_V"):
        parse_protocol(bad)


def test_current_above_channel_limit_is_refused_before_anything_runs():
    channel = Limits(voltage_min_V=0.5, voltage_max_V=3.5, current_max_A=0.001)
    with pytest.raises(ProtocolError, match="exceeds current_max_A"):
        compile_protocol(parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002, channel_limits=channel))


def test_protocol_wider_than_channel_window_is_refused():
    channel = Limits(voltage_min_V=1.5, voltage_max_V=3.5)
    with pytest.raises(ProtocolError, match="voltage_min_V 1.0 is below the channel's 1.5"):
        compile_protocol(parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002, channel_limits=channel))


def test_cv_setpoint_outside_safety_window_is_refused():
    bad = {**GOOD, "method": [{"cv": {"voltage_V": 3.2, "until": {"time_s": 10}}}]}
    with pytest.raises(ProtocolError, match="above the safety limit"):
        compile_protocol(parse_protocol(bad), CompileContext("r", nominal_capacity_Ah=0.002))


def test_a_limit_the_protocol_leaves_unset_is_inherited_from_the_channel_not_refused():
    channel = Limits(voltage_min_V=0.5, voltage_max_V=3.5, current_max_A=0.01, temperature_max_C=45)
    commands = compile_protocol(
        parse_protocol(GOOD), CompileContext("r", nominal_capacity_Ah=0.002, channel_limits=channel)
    )
    assert all(c.limits.current_max_A == 0.01 and c.limits.temperature_max_C == 45 for c in commands)
    assert all(c.limits.voltage_min_V == 1.0 for c in commands)  # the protocol's tighter window wins


def test_cycles_are_counted_from_charge_direction_not_from_nested_loop_counters():
    """seed003-cycling-eis nests 9 cycles inside a loop whose 10th cycle adds a rest and an EIS step:
    the interpreter numbers 20 electrochemical cycles where the loop counts 2 repetitions."""
    from labtwin.analysis.summary import summarize_run
    from labtwin.documents import EndReason, StepEvent, StepStats
    from labtwin.protocols.compile import compile_program
    from labtwin.protocols.program import Interpreter

    text = {
        "metadata": {"name": "nested", "nominal_capacity_Ah": 1.0},
        "record": {"interval_s": 10},
        "safety": {"voltage_min_V": 1.0, "voltage_max_V": 3.0},
        "method": [
            {"rest": {"duration_s": 60}},
            {
                "loop": {"until": {"cycles": 100}, "max_cycles": 2},
                "steps": [
                    {"repeat": 9, "steps": ["Charge at 1C until 2.5 V", "Discharge at 1C until 1.5 V"]},
                    "Charge at 1C until 2.5 V",
                    {"rest": {"duration_s": 60}},
                    {"eis": {"f_start_Hz": 1000, "f_end_Hz": 1}},
                    "Discharge at 1C until 1.5 V",
                ],
            },
        ],
    }
    interp = Interpreter(compile_program(parse_protocol(text), CompileContext("r", nominal_capacity_Ah=1.0)))
    events, repetitions = [], set()
    while (cmd := interp.next_command()) is not None:
        current = cmd.current_A or 0.0
        event = StepEvent(
            run_id="r",
            channel="c",
            step_index=cmd.step_index,
            label=cmd.label,
            cycle=cmd.cycle,
            step=cmd.step,
            event="ended",
            time_s=float(cmd.step_index),
            reason=EndReason(kind="end_condition", name="voltage_V"),
            stats=StepStats(
                charge_Ah=1.0 if current > 0 else 0.0, discharge_Ah=0.9 if current < 0 else 0.0, end_voltage_V=2.0
            ),
        )
        repetitions.add(cmd.repetition)
        events.append(event)
        interp.record(event)
    assert repetitions == {0, 1, 2}  # the rest before the loop, then two repetitions
    summary = summarize_run("r", "c", events)
    assert [c.cycle for c in summary.cycles] == list(range(1, 21))
    assert all(c.coulombic_efficiency == pytest.approx(0.9) for c in summary.cycles)
    eis_cycles = [e.cycle for e in summary.step_ends if e.label.startswith("EIS")]
    assert eis_cycles == [10, 20]
