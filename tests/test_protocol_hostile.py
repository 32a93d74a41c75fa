"""Hostile protocol, campaign and lab files (issue 14): each refused in one line naming the file and field, quickly,
within a memory bound, never a hang, a traceback or a MemoryError.

Every finding of the issue's "Protocol files" list is a case here, run both through ``labtwin protocol check``
(typer's CliRunner, the packaged lab's channel ch1) and through ``load_protocol`` + ``compile_program``; a hypothesis
property then holds the same for random protocol mappings (as Python data and as YAML text).
"""

from __future__ import annotations

import threading
import time
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from labtwin.cli import app
from labtwin.config.lab import LabConfigError, load_lab
from labtwin.documents import Limits
from labtwin.orchestration.campaign import load_campaign
from labtwin.protocols.compile import CompileContext, compile_program
from labtwin.protocols.model import ProtocolError, load_protocol, parse_protocol
from labtwin.protocols.safe_yaml import MAX_FILE_BYTES, YamlError, parse_yaml

runner = CliRunner()
TIME_BOUND_S = 5.0
MEMORY_BOUND_B = 200 * 1024 * 1024

# Fits the packaged lab's ch1 (0.05..3.1 V, 0.5 mA), so `protocol check --channel ch1` reaches the hostile part.
HEAD = """metadata: {name: hostile, nominal_capacity_Ah: 0.001}
safety: {voltage_min_V: 1.0, voltage_max_V: 3.0}
"""


def _deep(levels: int) -> str:
    text, indent = "method:\n", "  "
    for _ in range(levels):
        text += f"{indent}- repeat: 1\n{indent}  steps:\n"
        indent += "    "
    return text + f"{indent}- rest: {{duration_s: 1}}\n"


_BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['x'] * 9)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g"], "abcdefgh", strict=True)
)

# (name, file text after HEAD, what the one line must name)
CASES = [
    (
        "nested-repeat-100000",
        "method:\n  - repeat: 100000\n    steps:\n      - repeat: 100000\n        steps: [{rest: {duration_s: 1}}]\n",
        ":4: method[0].repeat",
    ),
    ("alias-bomb", _BOMB + "method: [{rest: {duration_s: 1}}]\n", "aliases expand to more than"),
    (
        "cv-step-1e-8",
        "method: [{cyclic_voltammetry: {start_V: 2, vertex_1_V: 2.9, vertex_2_V: 1.1, scan_rate_V_s: 0.001, "
        "step_V: 1.0e-8}}]\n",
        ":3: method[0].cyclic_voltammetry",
    ),
    ("300-nested-repeats", _deep(300), "nest at most 32 deep"),
    (
        "gitt-c-rate-0",
        "method: [{gitt: {c_rate: 0, pulse_s: 60, relax_s: 600, until_voltage_V: 2.9}}]\n",
        ":3: method[0].gitt",
    ),
    ("duration-inf", "method: [{rest: {duration_s: .inf}}]\n", ":3: method[0].rest.duration_s"),
    ("duplicate-key", "method: [{rest: {duration_s: 5, duration_s: 10}}]\n", ":3: method[0].rest.duration_s"),
    # beyond the list: the same bounds, other doors
    ("safety-limit-inf", "method: [{rest: {duration_s: 5}}]\n", "safety.voltage_max_V"),
    ("float-overflow", "method: [{rest: {duration_s: 1.0e+400}}]\n", ":3: method[0].rest.duration_s"),
    ("duplicate-top-key", "method: [{rest: {duration_s: 5}}]\nmethod: [{rest: {duration_s: 6}}]\n", ":4: method"),
    ("alias-in-itself", "loop: &a [*a]\nmethod: [{rest: {duration_s: 1}}]\n", ":3: alias *a is inside its own anchor"),
    (
        "eis-points",
        "method: [{eis: {f_start_Hz: 1.0e+300, f_end_Hz: 1.0e-300, points_per_decade: 100}}]\n",
        ":3: method[0].eis",
    ),
    ("c-over-zero", "method: ['Discharge at C/0 until 1.2 V']\n", "method[0]"),
    ("sentence-too-long", f"method: ['Charge at 1 mA for {'1' * 600} seconds']\n", "method[0]"),
    ("huge-integer", f"method: [{{repeat: {'9' * 5000}, steps: [{{rest: {{duration_s: 1}}}}]}}]\n", "method[0].repeat"),
    ("cc-zero-amperes", "method: [{cc: {current_A: 0, until: {time_s: 5}}}]\n", ":3: method[0].cc"),
    (
        "cv-scan-rate-0",
        "method: [{cyclic_voltammetry: {start_V: 2, vertex_1_V: 2.5, vertex_2_V: 1.5, scan_rate_V_s: 0}}]\n",
        "method[0].cyclic_voltammetry.scan_rate_V_s",
    ),
]


def _text(name: str, body: str) -> str:
    if name == "safety-limit-inf":
        return HEAD.replace("voltage_max_V: 3.0", "voltage_max_V: .inf") + body
    return HEAD + body


def _within(seconds: float, fn):
    """fn() in a thread: its result or exception, or a failure if it is still running after ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    return box, time.monotonic() - started


def _load_and_compile(path: Path):
    protocol = load_protocol(path)
    return compile_program(protocol, CompileContext("hostile", None, None))


@pytest.mark.parametrize(("name", "body", "names"), CASES, ids=[c[0] for c in CASES])
def test_a_hostile_protocol_is_refused_in_one_line_quickly_and_within_memory(tmp_path, name, body, names):
    path = tmp_path / f"{name}.yaml"
    path.write_text(_text(name, body))
    tracemalloc.start()
    try:
        box, took_s = _within(TIME_BOUND_S, lambda: _load_and_compile(path))
        _, peak_B = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    error = box.get("error")
    assert isinstance(error, ProtocolError), f"{name}: {box!r}"
    message = str(error)
    assert "\n" not in message and message.startswith(str(path)), message
    assert names in message, message
    assert took_s < TIME_BOUND_S and peak_B < MEMORY_BOUND_B, (took_s, peak_B)


@pytest.mark.parametrize(("name", "body", "names"), CASES, ids=[c[0] for c in CASES])
def test_protocol_check_refuses_a_hostile_file_in_one_line(tmp_path, name, body, names):
    path = tmp_path / f"{name}.yaml"
    path.write_text(_text(name, body))
    box, took_s = _within(
        TIME_BOUND_S, lambda: runner.invoke(app, ["protocol", "check", str(path), "--channel", "ch1"])
    )
    result = box["result"]
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), result.stderr
    assert names in lines[0] and "Traceback" not in result.output, lines[0]
    assert took_s < TIME_BOUND_S


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(HEAD + "method: [{rest: {duration_s: 1}}]\n" + "# padding\n" * (MAX_FILE_BYTES // 10 + 1))
    with pytest.raises(ProtocolError, match=r"big\.yaml: \d+ bytes; a protocol file is at most 1048576 bytes"):
        load_protocol(path)


def test_the_largest_expansion_allowed_compiles_and_one_more_step_is_refused(tmp_path):
    ok = parse_protocol(yaml.safe_load(HEAD + "method: [{repeat: 50000, steps: ['Rest for 1 s', 'Rest for 2 s']}]"))
    started = time.monotonic()
    assert len(compile_program(ok, CompileContext("x")).steps) == 100_000
    assert time.monotonic() - started < 15  # about 3 s here; the bound is generous for a loaded CI host
    over = yaml.safe_load(HEAD + "method: [{repeat: 50000, steps: ['Rest for 1 s', 'Rest for 2 s']}, 'Rest for 3 s']")
    with pytest.raises(ProtocolError, match=r"^over.yaml: method\[1\]: the method compiles to more than 100000 steps"):
        parse_protocol(over, "over.yaml")  # the loader counts, before anything (an export, a compile) expands


def test_export_of_a_hostile_file_is_refused_in_one_line_too(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text(HEAD + CASES[0][1])
    box, took_s = _within(TIME_BOUND_S, lambda: runner.invoke(app, ["protocol", "export", str(path)]))
    result = box["result"]
    assert result.exit_code == 1 and took_s < TIME_BOUND_S
    assert result.stderr.strip().startswith(f"error: {path}:4: method[0].repeat: 100000 repetitions"), result.stderr


def test_nesting_is_refused_in_a_protocol_built_in_python_too():
    item: dict = {"rest": {"duration_s": 1}}
    for _ in range(300):
        item = {"repeat": 1, "steps": [item]}
    data = yaml.safe_load(HEAD)
    with pytest.raises(ProtocolError, match="nest at most 32 deep") as info:
        parse_protocol({**data, "method": [item]}, "built.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("built.yaml: method[0].steps[0]")


def test_campaign_and_lab_files_go_through_the_same_bounded_reader(tmp_path):
    campaign = tmp_path / "c.yaml"
    campaign.write_text("campaign: c\ncampaign: d\ncells: []\n")
    with pytest.raises(ProtocolError, match=r"c\.yaml:2: campaign: key 'campaign' given twice \(first on line 1\)"):
        load_campaign(campaign)
    campaign.write_text(_BOMB + "campaign: c\n")
    with pytest.raises(ProtocolError, match="aliases expand to more than"):
        load_campaign(campaign)
    lab = tmp_path / "lab.yaml"
    lab.write_text(_BOMB + "lab: x\nchannels: {}\n")
    box, took_s = _within(TIME_BOUND_S, lambda: load_lab(lab))
    assert isinstance(box.get("error"), LabConfigError) and "aliases expand" in str(box["error"])
    lab.write_text("lab: x\nlab: y\nchannels: {}\n")
    with pytest.raises(LabConfigError, match=r"lab\.yaml:2: lab: key 'lab' given twice"):
        load_lab(lab)


def test_library_protocols_read_the_same_through_the_bounded_reader():
    from labtwin.protocols.model import LIBRARY

    for path in sorted(LIBRARY.glob("*.yaml")):
        assert parse_yaml(path.read_text(), str(path)).data == yaml.safe_load(path.read_text()), path


# --------------------------------------------------------------------------- property: random protocol mappings

HOSTILE = st.one_of(
    st.sampled_from([0, -1, 0.5, 1e-12, 1e-320, 1e300, 2**63, 100_001]),
    st.integers(-10, 100),
    st.floats(allow_nan=True, allow_infinity=True),
)
PLAUSIBLE = st.sampled_from([1, 2, 2.5, 0.1, 0.001, 0.0001, 60.0])
NUMBERS = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, HOSTILE)  # mostly plausible: many examples get to compiling
ANY = st.one_of(HOSTILE, st.text(max_size=12), st.none(), st.booleans(), st.lists(HOSTILE, max_size=3))
COUNTS = st.one_of(st.integers(1, 4), st.sampled_from([0, -1, 1000, 100_001, 10**9, 2**63, "3"]))
CONDITIONS = ["time_s", "voltage_V", "current_A", "c_rate", "capacity_Ah", "dvdt_V_per_h", "twin_soc", "bogus"]
UNTIL = st.one_of(
    st.fixed_dictionaries({"time_s": NUMBERS}, optional={"voltage_V": NUMBERS}),
    st.dictionaries(st.sampled_from(CONDITIONS), NUMBERS, max_size=3),
)


def _step(kind: str, required: dict, optional: dict | None = None) -> st.SearchStrategy:
    return st.fixed_dictionaries(required, optional=optional or {}).map(lambda d: {kind: d})


LEAVES = st.one_of(
    _step("rest", {"duration_s": NUMBERS}, {"until": UNTIL, "label": st.text(max_size=8), "bogus": ANY}),
    _step("cc", {"c_rate": NUMBERS, "until": UNTIL}, {"current_A": NUMBERS, "then": st.just({"time_s": "stop"})}),
    _step("cc", {"current_A": NUMBERS, "until": UNTIL}),
    _step("cp", {"power_W": NUMBERS, "until": UNTIL}),
    _step("cv", {"voltage_V": NUMBERS, "until": UNTIL}),
    _step("cccv", {"c_rate": NUMBERS, "voltage_V": NUMBERS, "until": UNTIL}, {"current_A": NUMBERS}),
    _step(
        "gitt",
        {"c_rate": NUMBERS, "pulse_s": NUMBERS, "relax_s": NUMBERS, "until_voltage_V": NUMBERS},
        {"current_A": NUMBERS, "max_pulses": COUNTS},
    ),
    _step(
        "cyclic_voltammetry",
        {
            "start_V": NUMBERS,
            "vertex_1_V": NUMBERS,
            "vertex_2_V": NUMBERS,
            "scan_rate_V_s": st.one_of(NUMBERS, st.lists(NUMBERS, max_size=4)),
        },
        {"cycles": COUNTS, "step_V": NUMBERS, "hold_start_s": NUMBERS},
    ),
    _step("eis", {}, {"f_start_Hz": NUMBERS, "f_end_Hz": NUMBERS, "points_per_decade": COUNTS, "amplitude": NUMBERS}),
    st.sampled_from(
        [
            "Rest for 1 hour",
            "Discharge at C/10 until 1.2 V",
            "Charge at C/0 until 2 V",
            "Hold at 2.5 V until C/50",
            "Charge at 1e400 A until 2 V",
            "Rest for 0 s",
        ]
    ),
    st.dictionaries(st.text(max_size=6), ANY, max_size=2),
    ANY,
)
STEPS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"repeat": COUNTS, "steps": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"group": st.sampled_from(["g", "h", "bad name"]), "steps": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries(
            {
                "loop": st.fixed_dictionaries({"until": st.just({"cycles": 2}), "max_cycles": COUNTS}),
                "steps": st.lists(inner, max_size=3),
            }
        ),
    ),
    max_leaves=12,
)
PROTOCOLS = st.fixed_dictionaries(
    {
        "metadata": st.fixed_dictionaries({"name": st.just("fuzz")}, optional={"nominal_capacity_Ah": NUMBERS}),
        "safety": st.fixed_dictionaries(
            {"voltage_min_V": st.one_of(st.just(0.5), NUMBERS), "voltage_max_V": st.one_of(st.just(3.0), NUMBERS)},
            optional={"current_max_A": NUMBERS},
        ),
        "method": st.lists(STEPS, min_size=1, max_size=4),
    },
    optional={"record": st.fixed_dictionaries({}, optional={"interval_s": NUMBERS, "poll_interval_s": NUMBERS})},
)
CHANNEL = Limits(voltage_min_V=0.05, voltage_max_V=3.1, current_max_A=0.0005)


def _load_compile_or_refuse(data: dict, channel: Limits | None) -> None:
    try:
        protocol = parse_protocol(data, "fuzz.yaml")
        compile_program(protocol, CompileContext("fuzz", 0.001, channel))
    except ProtocolError as exc:
        assert str(exc).strip(), "an empty refusal"


@settings(
    max_examples=1000,
    derandomize=True,
    deadline=timedelta(seconds=TIME_BOUND_S),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
@given(data=PROTOCOLS, on_channel=st.booleans(), as_text=st.booleans())
def test_any_protocol_mapping_loads_and_compiles_or_is_one_protocol_error(data, on_channel, as_text):
    channel = CHANNEL if on_channel else None
    if not as_text:
        _load_compile_or_refuse(data, channel)
        return
    text = yaml.safe_dump(data, allow_unicode=True)
    try:
        document = parse_yaml(text, "fuzz.yaml")
    except YamlError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.yaml")
        return
    if isinstance(document.data, dict):
        try:
            protocol = parse_protocol(document.data, "fuzz.yaml", document.lines)
            compile_program(protocol, CompileContext("fuzz", 0.001, channel))
        except ProtocolError as exc:
            assert str(exc).startswith("fuzz.yaml")


@settings(max_examples=800, derandomize=True, deadline=timedelta(seconds=TIME_BOUND_S), database=None)
@given(text=st.text(alphabet=st.sampled_from(list("[]{}&*!:-,'\"#|>.\n 0123456789abeinfx<")), max_size=200))
def test_any_text_is_a_document_or_one_yaml_error(text):
    try:
        parse_yaml(text, "fuzz.yaml")
    except YamlError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.yaml"), str(exc)
