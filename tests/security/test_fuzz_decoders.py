"""Fuzzing the bus's decoders (issue 13): thousands of hostile payloads, no crash, every rejection counted.

What a subscriber does with a payload is ``Verifier.check`` (signed labs), then ``open_envelope`` (a signed
payload read without the profile), then ``decode``. Each may refuse, and ``Bus._receive_loop`` counts a refusal
only for the exceptions it expects (Refused, Duplicate, MalformedPayload, BadSignature): anything else would end
the receive loop and with it the subscriber. So the properties here are that nothing else escapes, and that what
``decode`` accepts is something a consumer can use (finite floats, integers the store holds, a document that
re-encodes to itself), over arbitrary bytes, arbitrary JSON and mutations of every document kind (issue 14's
extreme values: integers >= 2**63, NaN, Infinity, 1e400, nulls, wrong types, deep nesting, long strings).

Hypothesis runs derandomized and without an example database, so CI runs the same cases every time.
"""

from __future__ import annotations

import atexit
import base64
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from pydantic import BaseModel

from labtwin.bus import Bus
from labtwin.bus.broker import EmbeddedBroker
from labtwin.config.secure_lab import SecuredLab
from labtwin.documents import (
    INT_MAX,
    MAX_BATCH_SAMPLES,
    MAX_PAYLOAD_BYTES,
    Anomaly,
    CellState,
    ChannelState,
    ChannelStatus,
    Column,
    EisSettings,
    EndConditions,
    EndReason,
    EndStep,
    GittSettings,
    Limits,
    MalformedPayload,
    Outage,
    PauseRun,
    RecordRule,
    ResumePoint,
    ResumeRun,
    RunStart,
    RunStop,
    SampleBatch,
    SecurityEvent,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StepStats,
    StopRun,
    SweepSettings,
    decode,
    encode,
)
from labtwin.security import BrokerConnection, load_profile
from labtwin.security.policy import Duplicate, Refused, Trusted, Verifier
from labtwin.security.signing import MAGIC, BadSignature, Envelope, Signer, new_private_key, open_envelope

LAB = "seclab"  # tests/security/conftest.py's lab

# Hypothesis caches what it learns (the constants of the code under test) in .hypothesis/: in a temporary
# directory of this session instead, so a run leaves nothing in the work tree.
_HOME = tempfile.mkdtemp(prefix="labtwin-test-hypothesis-")
set_hypothesis_home_dir(_HOME)
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max_examples)


STATS = StepStats(
    duration_s=12.5, charge_Ah=1e-3, energy_in_Wh=3e-3, start_voltage_V=3.1, end_voltage_V=4.2, n_samples=7
)
REASON = EndReason(kind="end_condition", name="voltage_V", value=4.2, threshold=4.2, message="reached")
LIMITS = Limits(voltage_min_V=2.5, voltage_max_V=4.3, current_max_A=0.01, step_time_max_s=3600, trip_delay_s=1)

# One valid document of every kind labtwin puts on its bus (every sub-model appears in at least one of them).
VALID: dict[str, list[BaseModel]] = {
    "cmd": [
        StartRun(
            run_id="r1",
            channel="ch1",
            cell_id="c1",
            protocol="p",
            n_steps=3,
            metadata={"note": "x"},
            anomaly_policy={"soft_short": "stop", "capacity_fade": "notify"},
            resume=ResumePoint(next_seq=4, time_s=10.0, capacity_Ah=1e-4, n_samples=40, step_index=1, step_stats=STATS),
        ),
        StepCommand(
            run_id="r1",
            step_index=0,
            label="charge",
            step=StepKind.cccv,
            current_A=1e-3,
            voltage_V=4.2,
            end=EndConditions(time_s=3600, current_A=1e-4, capacity_Ah=0.01, dvdt_V_per_h=1e-3, twin_soc=0.9),
            limits=LIMITS,
            record=RecordRule(interval_s=5, voltage_change_V=0.01, current_change_A=1e-5),
        ),
        StepCommand(
            run_id="r1",
            step_index=1,
            step=StepKind.gitt,
            current_A=-1e-4,
            gitt=GittSettings(pulse_s=60, relax_s=600, max_pulses=20),
            end=EndConditions(time_s=1e5, voltage_V=3.0),
        ),
        StepCommand(
            run_id="r1",
            step_index=2,
            step=StepKind.cyclic_voltammetry,
            sweep=SweepSettings(start_V=3.0, vertex_1_V=4.0, vertex_2_V=2.5, scan_rate_V_s=1e-3, cycles=2),
            end=EndConditions(time_s=1e4),
        ),
        StepCommand(
            run_id="r1",
            step_index=3,
            step=StepKind.eis,
            eis=EisSettings(f_start_Hz=1e5, f_end_Hz=0.1),
            limits=Limits(step_time_max_s=600),
        ),
        StopRun(run_id="r1", exit_status="aborted", reason="operator"),
        PauseRun(run_id="r1", reason="twin"),
        ResumeRun(run_id="r1"),
        EndStep(run_id="r1", step_index=0, reason=REASON),
    ],
    "event": [
        RunStart(
            run_id="r1",
            lab=LAB,
            channel="ch1",
            cell_id="c1",
            protocol="p",
            n_steps=3,
            first_seq=2,
            metadata={"a": "b"},
            anomaly_policy={"knee_onset": "pause"},
            columns=[Column(name="time_s", unit="s")],
        ),
        StepEvent(
            run_id="r1",
            channel="ch1",
            step_index=0,
            step=StepKind.cc,
            event="ended",
            time_s=12.5,
            reason=REASON,
            stats=STATS,
        ),
        RunStop(run_id="r1", channel="ch1", exit_status="success", n_samples=10, n_batches=2, last_seq=1),
        SecurityEvent(lab=LAB, channel="ch1", topic="labtwin/v1/seclab/ch1/cmd", sender="x", reason="unsigned"),
        Outage(
            run_id="r1",
            channel="ch1",
            step_index=1,
            from_time_s=10.0,
            to_time_s=70.0,
            span_s=60.0,
            wall_from=datetime(2026, 12, 2, 10, 0, tzinfo=UTC),
            wall_to=datetime(2026, 12, 2, 10, 1, tzinfo=UTC),
            wall_span_s=60.0,
            message="agent restart",
        ),
    ],
    "data": [
        SampleBatch(
            run_id="r1",
            channel="ch1",
            seq=3,
            time_s=[0.0, 1.0],
            voltage_V=[3.0, 3.1],
            current_A=[1e-3, 1e-3],
            capacity_Ah=[0.0, 2.7e-7],
            temperature_C=[None, 25.0],
            step=[0, 0],
            cycle=[1, 1],
        ),
        SampleBatch(
            run_id="r1",
            channel="ch1",
            seq=4,
            time_s=[0.0],
            voltage_V=[3.0],
            current_A=[0.0],
            capacity_Ah=[0.0],
            temperature_C=[None],
            step=[3],
            cycle=[1],
            frequency_Hz=[1e3],
            z_real_ohm=[10.0],
            z_imag_ohm=[-2.0],
        ),
    ],
    "status": [
        ChannelStatus(
            channel="ch1",
            state=ChannelState.running,
            run_id="r1",
            step_index=0,
            cycle=1,
            voltage_V=3.2,
            current_A=1e-3,
            temperature_C=25.0,
            speed=100.0,
            limits=LIMITS,
            nominal_capacity_Ah=0.01,
        )
    ],
    "state": [
        CellState(
            cell="c1",
            lab=LAB,
            channel="ch1",
            run_id="r1",
            time_s=1.0,
            step=0,
            soc=0.5,
            voltage_V=3.2,
            residual_V=1e-3,
            impedance_ohm={"R0": 1.5},
            anomalies=1,
        )
    ],
    "anomaly": [
        Anomaly(kind="soft_short", cell="c1", time_s=10.0, cycle=2, step=1, message="m", figures={"r_ohm": 3.0})
    ],
}
KINDS = tuple(VALID)
EXPECTED_TYPES: dict[str, tuple[type[BaseModel], ...]] = {
    kind: tuple({type(doc) for doc in docs}) for kind, docs in VALID.items()
}


def topic_for(kind: str) -> str:
    if kind in {"state", "anomaly"}:
        return f"labtwin/v1/{LAB}/cells/c1/{kind}"
    return f"labtwin/v1/{LAB}/ch1/{kind}"


# ---------------------------------------------------------------------------------------------- hostile values


class Raw:
    """JSON text spliced in verbatim where ``json.dumps`` cannot write it (1e400, 5000 digits, NaN inside a key)."""

    def __init__(self, text: str) -> None:
        self.text = text


def deep(depth: int, leaf: Any = 1) -> Any:
    out = leaf
    for i in range(depth):
        out = [out] if i % 2 else {"a": out}
    return out


EXTREMES: list[Any] = [
    2**63,
    2**63 - 1,
    -(2**63) - 1,
    2**64,
    10**30,
    INT_MAX + 1,
    -INT_MAX - 2,
    Raw("1" + "0" * 5000),
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e400"),
    Raw("-1e400"),
    Raw("1e-400"),
    math.nan,
    math.inf,
    None,
    True,
    "",
    "x" * 100_000,
    "\ud800",
    "\x00",
    [],
    {},
    [None],
    [math.nan],
    {"": None},
    deep(40),
    deep(300),
    -1,
    0,
    1.5,
    "1",
    "nan",
    "2026-13-45T99:99:99",
]


def _dumps(value: Any) -> bytes:
    """JSON with the Raw pieces spliced in (and NaN/Infinity written as Python's json writes them)."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value))
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00RAW{i}\x00"), raw)
    return text.encode("utf-8", "surrogatepass")


def _paths(value: Any, here: tuple = ()) -> Iterator[tuple]:
    yield here
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*here, i))


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    out = list(value)
    out[head] = _replace(value[head], rest, new)
    return out


def _delete(value: Any, path: tuple) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    head = path[0]
    if isinstance(value, dict):
        return {**value, head: _delete(value[head], path[1:])}
    out = list(value)
    out[head] = _delete(value[head], path[1:])
    return out


def mutate(doc: BaseModel, how: str, path_index: int, new: Any) -> bytes:
    """``doc`` as JSON with one of its fields (at any depth) replaced, deleted, or joined by an unknown one."""
    tree = json.loads(encode(doc))
    paths = list(_paths(tree))
    path = paths[path_index % len(paths)]
    if how == "replace":
        tree = _replace(tree, path, new)
    elif how == "delete" and path:
        tree = _delete(tree, path)
    elif how == "extra":
        tree = {**tree, "unknown_field": new}
    elif how == "duplicate_key":  # JSON allows it; the last one wins in every parser labtwin uses
        return _dumps(tree)[:-1] + b', "kind": ' + _dumps(new) + b"}"
    return _dumps(tree)


def all_numbers(value: Any) -> Iterator[float | int]:
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from all_numbers(getattr(value, name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from all_numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from all_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def assert_decodes_safely(kind: str, payload: bytes) -> BaseModel | None:
    """decode returns the topic's document, one a consumer can use, or raises MalformedPayload: nothing else."""
    try:
        doc = decode(topic_for(kind), payload)
    except MalformedPayload as exc:
        text = str(exc)  # logged by every subscriber: one line, short, whatever the sender put in keys and topics
        assert text.isprintable() and len(text) < 800, text[:200]
        return None
    assert isinstance(doc, EXPECTED_TYPES[kind]), f"{kind} decoded to {type(doc).__name__}"
    for number in all_numbers(doc):
        if isinstance(number, float):
            assert math.isfinite(number), f"{kind}: accepted a non-finite float"
        else:
            assert -INT_MAX - 1 <= number <= INT_MAX, f"{kind}: accepted an integer the store cannot hold"
    again = decode(topic_for(kind), encode(doc))  # what a recorder stores, a relay forwards, a replay re-reads
    assert again == doc
    return doc


# ------------------------------------------------------------------------------------------ decode properties

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)


def json_trees(max_leaves: int) -> st.SearchStrategy[Any]:
    # Small trees: Hypothesis spends its time drawing them, and deep or huge values come from EXTREMES.
    return st.recursive(
        scalars,
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=max_leaves,
    )


json_values = json_trees(12)
kinds = st.sampled_from((*KINDS, "bogus"))
hostile_values = st.sampled_from(EXTREMES) | scalars | json_trees(4)


def _kind_ok(kind: str, payload: bytes) -> None:
    if kind == "bogus":
        with pytest.raises(MalformedPayload):
            decode(f"labtwin/v1/{LAB}/ch1/bogus", payload)
    else:
        assert_decodes_safely(kind, payload)


@fuzz(800)
@given(kind=kinds, payload=st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_are_malformed(kind: str, payload: bytes) -> None:
    _kind_ok(kind, payload)


@fuzz(500)
@given(kind=kinds, value=json_values)
def test_arbitrary_json_decodes_or_is_malformed(kind: str, value: Any) -> None:
    _kind_ok(kind, _dumps(value))


@fuzz(1200)
@given(
    kind=st.sampled_from(KINDS),
    which=st.integers(min_value=0, max_value=100),
    how=st.sampled_from(("replace", "replace", "replace", "delete", "extra", "duplicate_key")),
    path_index=st.integers(min_value=0, max_value=10_000),
    new=hostile_values,
)
def test_mutated_documents_decode_or_are_malformed(kind: str, which: int, how: str, path_index: int, new: Any) -> None:
    docs = VALID[kind]
    assert_decodes_safely(kind, mutate(docs[which % len(docs)], how, path_index, new))


@st.composite
def documents_of_hostile_fields(draw: st.DrawFn) -> tuple[str, bytes]:
    """A document of the right kind with the right field names, each field kept, dropped or given a hostile value:
    past the discriminator, so every field's validation is reached (arbitrary JSON rarely gets there)."""
    kind = draw(st.sampled_from(KINDS))
    doc = draw(st.sampled_from(VALID[kind]))
    tree = json.loads(encode(doc))
    for name in type(doc).model_fields:
        if name in {"kind", "v"}:
            continue
        choice = draw(st.integers(0, 3))
        if choice == 1:
            tree.pop(name, None)
        elif choice >= 2:
            tree[name] = draw(hostile_values)
    return kind, _dumps(tree)


@fuzz(600)
@given(case=documents_of_hostile_fields())
def test_documents_with_hostile_fields_decode_or_are_malformed(case: tuple[str, bytes]) -> None:
    assert_decodes_safely(*case)


def test_a_rejection_is_one_short_line_whatever_the_sender_put_in_keys_and_topics():
    forged_key = b'{"kind":"start_run","run_id":"r","channel":"c","cell_id":"c","protocol":"p","n_steps":1,'
    forged_key += b'"metadata":{"x\\nERROR labtwin.agent: channel ch1 tripped' + b"!" * 5000 + b'":5}}'
    with pytest.raises(MalformedPayload) as caught:
        decode(topic_for("cmd"), forged_key)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300 and "metadata" in str(caught.value)
    with pytest.raises(MalformedPayload) as caught:
        decode("labtwin/v1/seclab/ch1\nERROR forged/data", b"{")
    assert "\n" not in str(caught.value)


def test_the_valid_documents_decode_as_themselves():
    for kind, docs in VALID.items():
        for doc in docs:
            assert assert_decodes_safely(kind, encode(doc)) == doc


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        # issue 14's findings, one by one
        (
            "event",
            b'{"kind":"step_event","run_id":"r","channel":"c","step_index":9223372036854775808,'
            b'"step":"cc","event":"ended","time_s":1}',
            "step_index",
        ),
        (
            "event",
            b'{"kind":"step_event","run_id":"r","channel":"c","step_index":1,"step":"cc","event":"ended","time_s":NaN}',
            "time_s",
        ),
        (
            "event",
            b'{"kind":"step_event","run_id":"r","channel":"c","step_index":1,'
            b'"step":"cc","event":"ended","time_s":1e400}',
            "time_s",
        ),
        (
            "data",
            b'{"kind":"samples","run_id":"r","channel":"c","seq":1,"time_s":[Infinity],"voltage_V":[1],'
            b'"current_A":[1],"capacity_Ah":[1],"temperature_C":[null],"step":[0],"cycle":[0]}',
            "time_s",
        ),
        (
            "event",
            b'{"kind":"run_start","run_id":"r","lab":"l","channel":"c","cell_id":"x","protocol":"p",'
            b'"n_steps":1,"anomaly_policy":"not json {"}',
            "anomaly_policy",
        ),
        ("cmd", b'{"kind":"step","run_id":"r","step_index":0,"step":"rest","end":{"time_s":-Infinity}}', "time_s"),
        (
            "data",
            b'{"kind":"samples","run_id":"r","channel":"c","seq":-1,"time_s":[],"voltage_V":[],'
            b'"current_A":[],"capacity_Ah":[],"temperature_C":[],"step":[],"cycle":[]}',
            "seq",
        ),
    ],
)
def test_issue_14_extremes_are_refused_naming_the_field(kind: str, payload: bytes, field: str):
    with pytest.raises(MalformedPayload, match=field):
        decode(topic_for(kind), payload)


def test_an_oversized_batch_is_refused_before_it_is_parsed():
    n = 600_000  # issue 14: a 20 MB batch put 524 000 rows in the store
    column = "[" + ",".join(["1.0"] * n) + "]"
    payload = (
        f'{{"kind":"samples","run_id":"r","channel":"c","seq":0,"time_s":{column},"voltage_V":{column},'
        f'"current_A":{column},"capacity_Ah":{column},"temperature_C":{column},"step":[],"cycle":[]}}'
    ).encode()
    assert len(payload) > MAX_PAYLOAD_BYTES
    t0 = time.perf_counter()
    with pytest.raises(MalformedPayload, match="bytes is over"):
        decode(topic_for("data"), payload)
    assert time.perf_counter() - t0 < 0.05
    # The largest batch allowed, every column full of 17-digit floats, fits the payload bound; one sample more does not.
    n = MAX_BATCH_SAMPLES
    # (within the physical bounds of every column: 1234.57 down to 234.58, as a temperature too)
    floats = [1234.5678901234567 - i * 0.1 for i in range(n)]
    full = SampleBatch(
        run_id="r" * 64,
        channel="c" * 32,
        seq=INT_MAX,
        time_s=floats,
        voltage_V=floats,
        current_A=floats,
        capacity_Ah=floats,
        temperature_C=floats,
        step=[INT_MAX] * n,
        cycle=[INT_MAX] * n,
        frequency_Hz=floats,
        z_real_ohm=floats,
        z_imag_ohm=floats,
    )
    assert len(encode(full)) < MAX_PAYLOAD_BYTES
    assert decode(topic_for("data"), encode(full)) == full
    many = {k: (v + v[:1] if isinstance(v, list) else v) for k, v in full.model_dump().items()}
    with pytest.raises(MalformedPayload, match="time_s"):
        decode(topic_for("data"), json.dumps(many).encode())


def test_a_missing_reading_is_none_and_a_status_with_one_still_publishes():
    """An instrument's NaN is "no reading" (None on the wire too): the agent's status must still be made."""
    status = ChannelStatus(channel="ch1", state=ChannelState.fault, voltage_V=math.nan, current_A=math.nan)
    assert status.voltage_V is None and decode(topic_for("status"), encode(status)) == status
    with pytest.raises(ValueError, match="finite"):
        ChannelStatus(channel="ch1", state=ChannelState.fault, voltage_V=math.inf)


# ------------------------------------------------------------------------------------------------- envelopes


@pytest.fixture(scope="module")
def lab_keys(secured_lab: SecuredLab):
    profile = load_profile(secured_lab.out / "security.yaml")
    signers = {
        name: Signer.from_file(name, profile.identity(name).signing_key)
        for name in ("orchestrator", "agent-ch1", "twin", "viewer")
    }
    return profile, signers


def _sealed(signers: dict[str, Signer], kind: str, which: int) -> tuple[str, bytes]:
    topic = topic_for(kind)
    sender = {"cmd": "orchestrator", "state": "twin", "anomaly": "twin"}.get(kind, "agent-ch1")
    docs = VALID[kind]
    return topic, signers[sender].seal(topic, encode(docs[which % len(docs)]))


def _header(payload: bytes) -> tuple[dict, bytes]:
    end = payload.index(b"\n")
    return json.loads(payload[len(MAGIC) : end]), payload[end + 1 :]


HEADER_VALUES = st.sampled_from(
    [
        None,
        True,
        0,
        -1,
        2**63,
        2**63 - 1,
        10**40,
        1.5,
        "",
        "x" * 600,
        "\ud800",
        [],
        {},
        "AAAA",
        "!!!!",
        base64.b64encode(b"\x00" * 63).decode(),
        base64.b64encode(b"\x00" * 64).decode(),
        base64.b64encode(b"\x00" * 65).decode(),
        base64.b64encode(b"\x00" * 64).decode()[:-1],
        base64.b64encode(b"\x00" * 64).decode() + "\n",
        1_764_650_000_123_456_789,  # a plausible nonce, fixed so every run draws the same cases
    ]
) | json_trees(4)


@st.composite
def garbled_envelopes(draw: st.DrawFn, signers: dict[str, Signer]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(KINDS))
    topic, payload = _sealed(signers, kind, draw(st.integers(0, 20)))
    how = draw(st.sampled_from(("truncate", "flip", "header_field", "drop_field", "raw_header", "body", "topic")))
    if how == "truncate":
        payload = payload[: draw(st.integers(0, len(payload)))]
    elif how == "flip":
        at = draw(st.integers(0, len(payload) - 1))
        payload = payload[:at] + bytes([payload[at] ^ draw(st.integers(1, 255))]) + payload[at + 1 :]
    elif how in {"header_field", "drop_field"}:
        header, body = _header(payload)
        key = draw(st.sampled_from(("by", "n", "sig", "extra")))
        if how == "header_field":
            header[key] = draw(HEADER_VALUES)
        else:
            header.pop(key, None)
        payload = MAGIC + _dumps(header) + b"\n" + body
    elif how == "raw_header":
        header_bytes = draw(st.binary(max_size=700) | st.builds(_dumps, json_trees(6)))
        payload = MAGIC + header_bytes + draw(st.sampled_from((b"\n", b"", b"\r\n"))) + _header(payload)[1]
    elif how == "body":
        header, body = _header(payload)
        payload = MAGIC + _dumps(header) + b"\n" + draw(st.binary(max_size=200) | st.just(body + b" "))
    else:  # a valid signature moved to another topic
        topic = draw(st.sampled_from([topic_for(k) for k in KINDS] + ["labtwin/v1/other/ch1/cmd", "x", ""]))
    return topic, payload


@fuzz(600)
@given(data=st.data())
def test_open_envelope_raises_only_bad_signature(lab_keys, data: st.DataObject) -> None:
    _, signers = lab_keys
    _, payload = data.draw(garbled_envelopes(signers) | st.tuples(st.just(""), st.binary(max_size=300)))
    try:
        envelope = open_envelope(MAGIC + payload if data.draw(st.booleans()) else payload)
    except BadSignature:
        return
    assert isinstance(envelope, Envelope) and 0 < envelope.nonce < 2**63 and len(envelope.signature) == 64


@fuzz(600)
@given(data=st.data())
def test_verifier_refuses_or_trusts_and_what_it_trusts_decodes_or_is_malformed(lab_keys, data: st.DataObject) -> None:
    """The whole receive path of a signed lab: Refused, Duplicate or MalformedPayload, and nothing else."""
    profile, signers = lab_keys
    verifier = Verifier(profile)
    topic, payload = data.draw(garbled_envelopes(signers))
    try:
        trusted = verifier.check(topic, payload)
    except (Refused, Duplicate):
        return
    assert isinstance(trusted, Trusted) and trusted.sender in signers
    kind = topic.rsplit("/", 1)[-1]
    assert kind in VALID, "trusted only on a labtwin topic"
    assert_decodes_safely(kind, trusted.body)


def test_a_valid_signed_document_is_trusted_once_and_its_replay_refused(lab_keys, monkeypatch):
    from labtwin.security import policy

    profile, signers = lab_keys
    verifier = Verifier(profile)
    topic, payload = _sealed(signers, "cmd", 0)
    assert verifier.check(topic, payload).sender == "orchestrator"
    with pytest.raises(Duplicate):  # again at once: a resend
        verifier.check(topic, payload)
    newer_topic, newer = _sealed(signers, "cmd", 1)
    verifier.check(newer_topic, newer)
    monkeypatch.setattr(policy, "RESEND_WINDOW_NS", -1)  # again later: a replay
    with pytest.raises(Refused, match="replayed"):
        verifier.check(topic, payload)
    with pytest.raises(Refused, match="does not verify"):
        verifier.check(topic, Signer("orchestrator", new_private_key()).seal(topic, encode(VALID["cmd"][0])))


# ---------------------------------------------------------------------------------------- end to end, a real Bus


def hostile_payloads(rng: random.Random, n: int, verifier: Verifier | None) -> list[tuple[str, bytes]]:
    """``n`` payloads a subscriber must refuse, over the data, event and cmd topics of ch1; each one is checked
    here, without a broker, to be refused by the path the bus takes (so the bus's count can be held to ``n``)."""
    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        kind = rng.choice(("data", "event", "cmd"))
        topic = topic_for(kind)
        pick = rng.random()
        if pick < 0.2:
            payload = rng.randbytes(rng.randint(0, 300))
        elif pick < 0.7:
            doc = rng.choice(VALID[kind])
            new = rng.choice([v for v in EXTREMES if not (isinstance(v, str) and len(v) > 1000)])
            payload = mutate(doc, rng.choice(("replace", "replace", "delete", "extra")), rng.randrange(10_000), new)
        elif pick < 0.85:  # a valid document in a broken envelope
            header = rng.choice(
                [b'{"by":"agent-ch1","n":1,"sig":"!!"}', b"{", b'{"by":1}', b"\xff\xfe", b'{"n":' + b"9" * 30 + b"}"]
            )
            payload = MAGIC + header + b"\n" + encode(rng.choice(VALID[kind]))
        else:  # a valid document of another topic's kind
            payload = encode(rng.choice(VALID[rng.choice([k for k in KINDS if k != kind])]))
        if verifier is not None and rng.random() < 0.3:  # signed as the channel's agent, with another key
            payload = Signer("agent-ch1", new_private_key()).seal(topic, payload)
        if _refused_offline(topic, payload, verifier):
            out.append((topic, payload))
    return out


def _refused_offline(topic: str, payload: bytes, verifier: Verifier | None) -> bool:
    try:
        if verifier is not None:
            payload = verifier.check(topic, payload).body
        elif payload.startswith(MAGIC):  # a signed payload read without the lab's profile (Bus._receive_loop)
            payload = open_envelope(payload).body
        decode(topic, payload)
    except (Refused, MalformedPayload, BadSignature):
        return True
    return False


async def _wait_for(sub, predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        message = await sub.get(timeout_s=max(0.1, deadline - time.monotonic()))
        if predicate(message.document):
            return message


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned-lab", "signed-lab"])
async def test_a_subscriber_survives_hundreds_of_hostile_payloads_and_counts_every_one(
    signed: bool, secured_lab: SecuredLab, lab_keys
):
    profile, signers = lab_keys
    hostile = hostile_payloads(random.Random(13 + signed), 400, Verifier(profile) if signed else None)
    final = SampleBatch(
        run_id="after-the-storm",
        channel="ch1",
        seq=0,
        time_s=[0.0],
        voltage_V=[3.0],
        current_A=[0.0],
        capacity_Ah=[0.0],
        temperature_C=[None],
        step=[0],
        cycle=[0],
    )
    body = encode(final)
    async with EmbeddedBroker() as broker:
        conn = BrokerConnection.parse(broker.url, secured_lab.out / "security.yaml" if signed else None, "recorder")
        async with Bus(conn, f"fuzz-subscriber-{int(signed)}") as subscriber:
            sub = await subscriber.subscribe([topic_for("data"), topic_for("event"), topic_for("cmd")])
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="fuzzer", identifier=f"fuzzer-{time.monotonic_ns()}"
            ) as raw:
                for topic, payload in hostile:
                    await raw.publish(topic, payload, qos=1)
                await raw.publish(
                    topic_for("data"), signers["agent-ch1"].seal(topic_for("data"), body) if signed else body, qos=1
                )
            got = await _wait_for(sub, lambda d: isinstance(d, SampleBatch) and d.run_id == "after-the-storm")
            alive = subscriber.connected and subscriber._manager is not None and not subscriber._manager.done()
            stats = subscriber.stats
    assert alive, "the subscriber's receive loop is still running"
    assert got.document == final
    assert sub.pending() == 0, "no hostile payload was delivered as a document"
    assert stats.received == len(hostile) + 1
    assert stats.malformed + stats.refused == len(hostile) == 400
    if signed:
        assert stats.refused == len(hostile)
