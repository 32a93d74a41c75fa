"""Defence in depth: with the broker wide open (the embedded one takes anyone, as a misconfigured Mosquitto
would), the agent and the recorder still act only on documents signed by who may send them.

The attacker here is what the issue's findings used: a client with no credentials of its own, reading the
retained status for the run id, then publishing forged or replayed commands and data.
"""

from __future__ import annotations

import asyncio
import time

import aiomqtt
import pytest

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.cli.wiring import LocalLab
from labtwin.config.secure_lab import SecuredLab
from labtwin.documents import (
    EndConditions,
    Limits,
    PauseRun,
    RunStart,
    RunStop,
    SampleBatch,
    SecurityEvent,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StopRun,
    encode,
)
from labtwin.security import as_identity, load_profile
from labtwin.security.signing import Signer, new_private_key
from tests.helpers import sim_lab, wait_doc

LAB = "seclab"


def _profile_path(secured_lab: SecuredLab):
    return secured_lab.out / "security.yaml"


async def _raw_publish(url, topic: str, payload: bytes, retain: bool = False) -> None:
    """The attacker: a bare MQTT client with no labtwin profile (the embedded broker takes any username)."""
    conn = as_identity(url, "nobody")
    async with aiomqtt.Client(
        conn.host, conn.port, username="intruder", identifier=f"intruder-{time.monotonic_ns()}"
    ) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


def _forged_batch(run_id: str, channel: str, seq: int) -> SampleBatch:
    """The issue's forgery: 9.99 V, 1 A, 99 degC."""
    return SampleBatch(
        run_id=run_id,
        channel=channel,
        seq=seq,
        step=[0],
        cycle=[0],
        time_s=[1.0],
        voltage_V=[9.99],
        current_A=[1.0],
        capacity_Ah=[0.0],
        temperature_C=[99.0],
    )


async def _rest_then_stop(orchestrator: Bus, events, run_id: str, time_s: float) -> RunStop:
    """One rest step at 1 s sampling, then StopRun: the run the forgeries try to spoil."""
    cmd_topic = busmod.topic(LAB, "ch1", "cmd")
    step = StepCommand(
        run_id=run_id, step_index=0, step=StepKind.rest, end=EndConditions(time_s=time_s), sample_interval_s=1
    )
    await orchestrator.publish(cmd_topic, step)
    await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "ended", timeout_s=60)
    await orchestrator.publish(cmd_topic, StopRun(run_id=run_id, exit_status="success"))
    return await wait_doc(events, lambda d: isinstance(d, RunStop) and d.run_id == run_id)


@pytest.fixture
async def signed_lab(secured_lab: SecuredLab, tmp_path):
    profile = _profile_path(secured_lab)
    lab = sim_lab(
        LAB,
        {"ch1": "lto_bare_thinfilm", "ch2": "lco_lgps_glassy"},
        Limits(voltage_min_V=0.5, voltage_max_V=3.0),
        speed=100,
    )
    async with LocalLab(lab, ["ch1"], None, str(tmp_path / "s.db"), security=profile) as local:
        yield local


async def test_forged_unsigned_wrong_key_viewer_and_replayed_commands_are_refused_and_the_step_goes_on(
    signed_lab, secured_lab
):
    local = signed_lab
    url = local.url
    cmd_topic = busmod.topic(LAB, "ch1", "cmd")
    captured: list[bytes] = []
    conn = as_identity(url, "x")
    async with (
        aiomqtt.Client(conn.host, conn.port, username="sniffer", identifier="sniffer") as sniffer,
        Bus(as_identity(url, "orchestrator"), "test-orchestrator") as orchestrator,
    ):
        await sniffer.subscribe(cmd_topic, qos=1)

        async def sniff():
            async for m in sniffer.messages:
                captured.append(bytes(m.payload))

        sniffing = asyncio.create_task(sniff())
        events = await orchestrator.subscribe(busmod.topic(LAB, "ch1", "event"))
        run_id = "r-forged-cmds"
        await orchestrator.publish(
            cmd_topic, StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="p", n_steps=1)
        )
        await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
        # 1200 s of rest at 100x: 12 s of wall time, long enough to attack it.
        step = StepCommand(
            run_id=run_id, step_index=0, step=StepKind.rest, end=EndConditions(time_s=1200), sample_interval_s=10
        )
        await orchestrator.publish(cmd_topic, step)
        await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "started")

        forged_stop = StopRun(run_id=run_id, exit_status="aborted", reason="forged")
        # (a) unsigned, as mosquitto_pub would send it
        await _raw_publish(url, cmd_topic, encode(forged_stop))
        # (b) signed as "orchestrator" with a key that is not the orchestrator's
        await _raw_publish(
            url, cmd_topic, Signer("orchestrator", new_private_key()).seal(cmd_topic, encode(forged_stop))
        )
        # (c) signed by the viewer's real key: a viewer may not command
        profile = load_profile(_profile_path(secured_lab))
        viewer = Signer.from_file("viewer", profile.identity("viewer").signing_key)
        await _raw_publish(url, cmd_topic, viewer.seal(cmd_topic, encode(PauseRun(run_id=run_id, reason="forged"))))
        # (d) a replay of the orchestrator's own StartRun, captured off the wire (within the resend window it is
        # dropped as a resend; later it is refused as a replay: tests/security/test_policy.py)
        await asyncio.sleep(0.2)
        start_run = next(c for c in captured if c.startswith(b'LTS1 {"by":"orchestrator"') and b"start_run" in c)
        await _raw_publish(url, cmd_topic, start_run)

        expected = {
            "unsigned": lambda e: e.sender is None and "unsigned" in e.reason,
            "wrong key": lambda e: e.sender == "orchestrator" and "does not verify" in e.reason,
            "viewer": lambda e: e.sender == "viewer" and "may not publish" in e.reason,
        }
        seen: set[str] = set()
        while seen != set(expected):
            event = await wait_doc(events, lambda d: isinstance(d, SecurityEvent), timeout_s=10)
            seen |= {name for name, match in expected.items() if match(event)}
        ended = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "ended", timeout_s=60)
        await orchestrator.publish(cmd_topic, StopRun(run_id=run_id, exit_status="success"))
        stop = await wait_doc(events, lambda d: isinstance(d, RunStop) and d.run_id == run_id)
        sniffing.cancel()

    assert ended.reason.kind == "end_condition" and ended.stats.duration_s == pytest.approx(1200, abs=10)
    assert stop.exit_status == "success"
    agent_bus = local.agents["ch1"].bus
    assert agent_bus.stats.refused >= 3
    assert agent_bus.stats.duplicates >= 1  # the replayed StartRun: seen seconds ago, dropped, not acted on again


async def test_a_forged_batch_is_not_stored_and_the_real_one_is(signed_lab, secured_lab):
    local = signed_lab
    url = local.url
    data_topic = busmod.topic(LAB, "ch1", "data")
    profile = load_profile(_profile_path(secured_lab))
    other_agent = Signer.from_file("agent-ch2", profile.identity("agent-ch2").signing_key)
    run_id = "r-forged-data"
    forged = _forged_batch(run_id, "ch1", seq=1)
    async with Bus(as_identity(url, "orchestrator"), "test-orchestrator-2") as orchestrator:
        events = await orchestrator.subscribe(busmod.topic(LAB, "ch1", "event"))
        cmd_topic = busmod.topic(LAB, "ch1", "cmd")
        await orchestrator.publish(
            cmd_topic, StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="p", n_steps=1)
        )
        await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
        # Ahead of the agent: the forgery takes seq 1 before the real batch 1 exists.
        await _raw_publish(url, data_topic, encode(forged))  # unsigned
        await _raw_publish(url, data_topic, other_agent.seal(data_topic, encode(forged)))  # ch2's agent on ch1
        stop = await _rest_then_stop(orchestrator, events, run_id, 600)
    await local.wait_stored(run_id)
    samples = local.store.samples(run_id)
    assert len(samples["voltage_V"]) == stop.n_samples > 1
    assert samples["voltage_V"].max() < 3.0 and samples["temperature_C"].max() < 99
    assert local.recorder.bus.stats.refused == 2


async def test_a_forged_retained_offline_status_is_overwritten_by_the_agent(signed_lab):
    local = signed_lab
    status_topic = busmod.topic(LAB, "ch1", "status")
    forged = b'{"v":1,"kind":"status","channel":"ch1","state":"offline","message":"forged"}'
    await _raw_publish(local.url, status_topic, forged, retain=True)
    # A newcomer (as `labtwin run` checks the channel) sees the agent, not the forgery.
    from labtwin.cli.wiring import check_channel

    deadline = time.monotonic() + 10
    while True:
        try:
            status = await check_channel(local.url, LAB, "ch1", timeout_s=2)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    assert status.state.value == "idle"


async def test_a_forged_run_on_an_idle_channel_never_starts_current(signed_lab):
    """The finding: a forged start_run plus a cc step at ~8C drove a cell past its limit. Here neither the
    unsigned StartRun nor the StepCommand (with a run id of its own) is acted on: no RunStart, no current."""
    local = signed_lab
    url = local.url
    cmd_topic = busmod.topic(LAB, "ch1", "cmd")
    run_id = "r-forged-start"
    async with Bus(as_identity(url, "viewer"), "test-watcher") as watcher:
        events = await watcher.subscribe(busmod.topic(LAB, "ch1", "event"))
        start = StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="forged", n_steps=1)
        step = StepCommand(
            run_id=run_id, step_index=0, step=StepKind.cc, current_A=4e-4, end=EndConditions(time_s=3600)
        )
        await _raw_publish(url, cmd_topic, encode(start))
        await _raw_publish(url, cmd_topic, encode(step))
        seen = [await wait_doc(events, lambda d: isinstance(d, SecurityEvent), timeout_s=10) for _ in range(2)]
        with pytest.raises(TimeoutError):
            await wait_doc(events, lambda d: isinstance(d, (RunStart, StepEvent)), timeout_s=1.5)
    agent = local.agents["ch1"]
    assert all(e.sender is None for e in seen)
    assert agent.run is None and agent.driver.mode == "off"


async def test_a_forged_run_stop_on_the_event_topic_is_not_stored(signed_lab):
    """The finding: a forged RunStop put "success, forged: all fine" in the store. The recorder refuses it."""
    local = signed_lab
    url = local.url
    run_id = "r-forged-stop"
    async with Bus(as_identity(url, "orchestrator"), "test-orchestrator-3") as orchestrator:
        events = await orchestrator.subscribe(busmod.topic(LAB, "ch1", "event"))
        cmd_topic = busmod.topic(LAB, "ch1", "cmd")
        await orchestrator.publish(
            cmd_topic, StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="p", n_steps=1)
        )
        await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
        forged = RunStop(run_id=run_id, channel="ch1", exit_status="success", reason="forged: all fine")
        await _raw_publish(url, busmod.topic(LAB, "ch1", "event"), encode(forged))
        await orchestrator.publish(cmd_topic, StopRun(run_id=run_id, exit_status="aborted", reason="operator"))
        stop = await wait_doc(events, lambda d: isinstance(d, RunStop) and d.reason == "operator")
    await local.wait_stored(run_id)
    (run,) = [r for r in local.store.runs() if r.run_id == run_id]
    assert stop.exit_status == "aborted" and run.exit_status == "aborted" and "forged" not in (run.reason or "")


@pytest.mark.parametrize("identity", ["twin", "operator"])
async def test_only_the_orchestrator_starts_runs_and_sources_current(signed_lab, secured_lab, identity):
    """The review's finding: a twin or operator key is a commander's key, but may only pause, resume or stop."""
    local = signed_lab
    url = local.url
    cmd_topic = busmod.topic(LAB, "ch1", "cmd")
    profile = load_profile(_profile_path(secured_lab))
    signer = Signer.from_file(identity, profile.identity(identity).signing_key)
    run_id = f"r-{identity}-start"
    start = StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="x", n_steps=1)
    step = StepCommand(run_id=run_id, step_index=0, step=StepKind.cc, current_A=4e-4, end=EndConditions(time_s=60))
    async with Bus(as_identity(url, "viewer"), f"test-watch-{identity}") as watcher:
        events = await watcher.subscribe(busmod.topic(LAB, "ch1", "event"))
        for doc in (start, step):
            await _raw_publish(url, cmd_topic, signer.seal(cmd_topic, encode(doc)))
        refusals = [await wait_doc(events, lambda d: isinstance(d, SecurityEvent), timeout_s=10) for _ in range(2)]
    assert all(r.sender == identity and "may not give a" in r.reason for r in refusals)
    assert local.agents["ch1"].run is None and local.agents["ch1"].driver.mode == "off"


async def test_an_agent_speaks_only_for_its_own_channel(signed_lab, secured_lab):
    """agent-ch2's key, on its own topic, writing a batch that names ch1 (the review's cross-channel forgery):
    refused by the receiver; and one that names ch2 but a run of ch1: refused by the store."""
    local = signed_lab
    url = local.url
    profile = load_profile(_profile_path(secured_lab))
    ch2 = Signer.from_file("agent-ch2", profile.identity("agent-ch2").signing_key)
    run_id = "r-cross-channel"
    async with Bus(as_identity(url, "orchestrator"), "test-orchestrator-4") as orchestrator:
        events = await orchestrator.subscribe(busmod.topic(LAB, "ch1", "event"))
        cmd_topic = busmod.topic(LAB, "ch1", "cmd")
        await orchestrator.publish(
            cmd_topic, StartRun(run_id=run_id, channel="ch1", cell_id="c", protocol="p", n_steps=1)
        )
        await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
        await local.recorder.wait_ready()
        ch2_topic = busmod.topic(LAB, "ch2", "data")
        for channel in ("ch1", "ch2"):
            forged = _forged_batch(run_id, channel, seq=0)
            await _raw_publish(url, ch2_topic, ch2.seal(ch2_topic, encode(forged)))
        stop = await _rest_then_stop(orchestrator, events, run_id, 300)
    await local.wait_stored(run_id)
    samples = local.store.samples(run_id)
    assert len(samples["voltage_V"]) == stop.n_samples and samples["voltage_V"].max() < 3.0
    assert local.store.conflicts(run_id) == []
    assert local.recorder.bus.stats.refused >= 1  # the batch naming ch1 on ch2's topic
