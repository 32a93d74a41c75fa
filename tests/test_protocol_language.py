"""The protocol language as an author meets it: step sentences, errors with file, line and field, the JSON
Schema editors validate with, `labtwin protocol show|check|export`, and the PyBaMM export."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from labtwin.cli import app
from labtwin.protocols.compile import CompileContext, compile_protocol
from labtwin.protocols.model import LIBRARY, Protocol, ProtocolError, load_protocol, parse_protocol
from labtwin.protocols.strings import StepStringError, parse_step_string, to_pybamm

runner = CliRunner()
HEAD = "metadata: {name: t, nominal_capacity_Ah: 0.001}\nsafety: {voltage_min_V: 2.5, voltage_max_V: 4.3}\n"


@pytest.mark.parametrize(
    ("sentence", "typed"),
    [
        ("Rest for 1 hour", {"rest": {"duration_s": 3600.0}}),
        ("Discharge at C/10 until 3.0 V", {"cc": {"c_rate": -0.1, "until": {"voltage_V": 3.0}}}),
        (
            "Charge at 0.5C for 2 hours or until 4.2 V",
            {"cc": {"c_rate": 0.5, "until": {"time_s": 7200.0, "voltage_V": 4.2}}},
        ),
        ("Charge at 20 mA until 4100 mV", {"cc": {"current_A": 0.02, "until": {"voltage_V": 4.1}}}),
        ("Hold at 4.2 V until C/50", {"cv": {"voltage_V": 4.2, "until": {"c_rate": 0.02}}}),
        ("Hold at 4.2 V for 30 minutes", {"cv": {"voltage_V": 4.2, "until": {"time_s": 1800.0}}}),
    ],
)
def test_a_sentence_compiles_to_the_same_step_as_its_mapping(sentence, typed):
    parsed = parse_step_string(sentence)
    assert parsed[next(iter(typed))].pop("label") == sentence
    assert parsed == typed
    ctx = CompileContext("t", 0.001)
    from_sentence = compile_protocol(parse_protocol(yaml.safe_load(HEAD + f"method: ['{sentence}']")), ctx)[0]
    from_mapping = compile_protocol(parse_protocol({**yaml.safe_load(HEAD), "method": [typed]}), ctx)[0]
    assert from_sentence.model_dump(exclude={"label"}) == from_mapping.model_dump(exclude={"label"})


def test_sentences_labtwin_cannot_run_are_refused_with_the_reason():
    with pytest.raises(StepStringError, match="constant resistance"):
        parse_step_string("Discharge at 10 Ohm for 10 minutes")
    assert parse_step_string("Discharge at 2 mW until 2.5 V")["cp"] == {
        "power_W": -0.002,
        "until": {"voltage_V": 2.5},
        "label": "Discharge at 2 mW until 2.5 V",
    }
    with pytest.raises(StepStringError, match="not a time"):
        parse_step_string("Rest for a while")
    with pytest.raises(StepStringError, match="write e.g."):
        parse_step_string("Charge it up")


def test_errors_name_the_file_the_line_and_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        HEAD + "method:\n  - Rest for 10 minutes\n  - Discharge at 2 Ohm for 1 hour\n"
        "  - cc: {c_rate: 1, until: {voltage_V: 4.1}, wibble: 3}\n  - wobble: {x: 1}\n"
        "  - repeat: 2\n    steps:\n      - rest: {duration_s: -5}\n"
    )
    with pytest.raises(ProtocolError) as caught:
        load_protocol(bad)
    message = str(caught.value)
    assert f"{bad}:5: method[1]: '2 Ohm': constant resistance" in message
    assert f"{bad}:6: method[2].cc.wibble: Extra inputs are not permitted (got 3)" in message
    assert f"{bad}:7: method[3]: a step is a mapping with one of rest, cc" in message
    assert f"{bad}:10: method[4].steps[0].rest.duration_s: Input should be greater than 0 (got -5)" in message
    assert len(message.splitlines()) == 4  # one line per mistake (each naming the file), not one per step kind


def test_the_json_schema_accepts_every_library_protocol_and_a_sentence_and_rejects_a_typo():
    schema = Protocol.model_json_schema()
    for path in sorted(LIBRARY.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    jsonschema.validate(
        yaml.safe_load(HEAD + "method: ['Rest for 1 hour', {cc: {c_rate: 1, until: {voltage_V: 4}}}]"), schema
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(HEAD + "method: [{cc: {c_rate: 1, untill: {voltage_V: 4}}}]"), schema)


def test_schema_show_and_check_on_the_command_line(tmp_path):
    result = runner.invoke(app, ["schema", "protocol"])
    assert result.exit_code == 0 and json.loads(result.output)["title"] == "labtwin protocol"
    shown = runner.invoke(app, ["protocol", "show", "lco_formation", "--channel", "ch2", "--json"])
    assert shown.exit_code == 0
    steps = json.loads(shown.output)
    assert [s["step"] for s in steps[:3]] == ["rest", "cc", "cv"] and steps[1]["current_A"] == pytest.approx(
        0.2 * 1.02e-3, rel=0.05
    )
    ok = runner.invoke(app, ["protocol", "check", "lco_formation", "--channel", "ch2"])
    assert ok.exit_code == 0 and "ok: 16 steps fit channel ch2" in " ".join(ok.output.split())
    refused = runner.invoke(app, ["protocol", "check", "lco_formation", "--channel", "ch1"])
    assert refused.exit_code == 1
    assert "asks for more than the channel allows: voltage_max_V 3.75 is above the channel's 3.1" in " ".join(
        refused.output.split()
    )


def test_the_pybamm_export_reads_back_as_the_same_steps():
    protocol = load_protocol("lco_formation")
    conditions = to_pybamm(protocol)
    assert conditions[0] == "Rest for 600 seconds" and isinstance(conditions[1], list | tuple)
    # read the export back through labtwin's own sentence parser: the same compiled steps
    method: list = []
    for entry in conditions:
        method.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    again = parse_protocol({**protocol.model_dump(exclude={"method"}, exclude_none=True), "method": method})
    ctx = CompileContext("t", 1.02e-3)
    original = [c for c in compile_protocol(protocol, ctx)]
    flat = compile_protocol(again, ctx)
    # a cccv becomes a cc then a hold; everything else one to one
    assert [(c.step.value, c.current_A, c.voltage_V) for c in flat if c.step.value != "cv"] == [
        (c.step.value, c.current_A, c.voltage_V) for c in original if c.step.value != "cv"
    ]
    pybamm = pytest.importorskip("pybamm")  # a bench dependency: checked where it is installed
    pybamm.Experiment(conditions)


def test_steps_pybamm_cannot_express_are_named():
    with pytest.raises(
        StepStringError, match=r"method\[1\]\.steps\[3\]: EIS steps have no PyBaMM Experiment equivalent"
    ):
        to_pybamm(load_protocol("seed003-cycling-eis"))


def test_library_protocols_in_sentences_exist():
    text = (Path(LIBRARY) / "pybamm-style-cycling.yaml").read_text()
    assert "Discharge at" in text
    compile_protocol(load_protocol("pybamm-style-cycling"), CompileContext("t", None))


def test_the_pybamm_export_names_end_conditions_it_cannot_say_instead_of_dropping_them():
    from labtwin.protocols.strings import to_pybamm

    protocol = parse_protocol(
        yaml.safe_load(HEAD + "method:\n  - cc: {c_rate: -1, until: {voltage_V: 3.0, dvdt_V_per_h: 0.01}}\n")
    )
    with pytest.raises(StepStringError, match="dvdt_V_per_h has no PyBaMM step string"):
        to_pybamm(protocol)
    cp = parse_protocol(
        yaml.safe_load(HEAD + "method:\n  - cp: {power_W: -0.002, until: {voltage_V: 3.0, time_s: 60}}\n")
    )
    assert to_pybamm(cp) == ["Discharge at 0.002 W for 60 seconds or until 3 V"]
