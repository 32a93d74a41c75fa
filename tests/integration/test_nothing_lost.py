"""Gap filling (issue 14): what the broker never delivered to the recorder comes from the agent's spool.

A recorder that goes away and comes back under a new (non-persistent, for the broker) session misses
everything published meanwhile; before the spool those samples were lost for good. Now the recorder sees
the gap in the run's seqs (or, at its start, a stored run with no RunStop), publishes a ResendRequest on
the channel's cmd topic, and the agent answers from its spool: every seq is stored exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from labtwin.agent import Agent
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.wiring import build_channel
from labtwin.data.recorder import Recorder
from labtwin.data.store import Store
from labtwin.documents import EndConditions, Limits, StepCommand, StepKind
from labtwin.security import BrokerConnection, as_identity
from tests.helpers import run_steps_by_hand, sim_lab
from tests.security.conftest import secured_lab  # noqa: F401  # a fixture: the signed lab's profile

SPEED = 1000
CELL_S = 3000  # 3 s of wall time at 1 s sampling


def _agent(lab: str, url: str | BrokerConnection, spool: Path, channel: str = "ch") -> Agent:
    config = sim_lab(lab, {channel: "lco_lgps_glassy"}, Limits(voltage_min_V=1.9, voltage_max_V=3.8), speed=SPEED)
    built = build_channel(channel, config.channel(channel), SPEED, lab)
    return Agent(
        lab=lab,
        channel=channel,
        driver=built.driver,
        clock=built.clock,
        broker_url=url,
        channel_limits=config.channel(channel).limits,
        cell_id="c",
        batch_size=5,
        spool_dir=spool,
    )


async def _until(predicate, timeout_s: float = 20.0) -> None:
    async def _wait() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(_wait(), timeout_s)


async def _record_with_a_gap(
    broker_url: str | BrokerConnection, lab: str, tmp_path: Path, *, back_after_run: bool, channel: str = "ch"
) -> None:
    """Recorder A stores the start of the run and stops; recorder B, a new session, comes back mid-run (or once
    the run is over) with the same store. Every seq ends up stored exactly once."""
    store = Store.open(tmp_path / "store.db")
    agent_stop, a_stop, b_stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
    agent = _agent(lab, broker_url, tmp_path / "spool", channel)
    flow_url = as_identity(broker_url, "orchestrator") if isinstance(broker_url, BrokerConnection) else broker_url
    rec_a = Recorder(broker_url, store, lab, client_id=f"rec-a-{lab}", resend_every_s=0.3)
    rec_b = Recorder(broker_url, store, lab, client_id=f"rec-b-{uuid.uuid4().hex[:8]}", resend_every_s=0.3)
    tasks = [asyncio.create_task(agent.serve(agent_stop)), asyncio.create_task(rec_a.serve(a_stop))]
    cmd = StepCommand(run_id="gap", step_index=0, step=StepKind.rest, end=EndConditions(time_s=CELL_S))
    try:
        await agent.wait_ready()
        await rec_a.wait_ready()
        driving = asyncio.create_task(run_steps_by_hand(flow_url, lab, channel, "gap", [cmd]))  # type: ignore[arg-type]
        await _until(lambda: rec_a.stats.batches >= 20)
        a_stop.set()
        await asyncio.wait_for(tasks.pop(), 10)
        stored_by_a = set(store.seqs("gap"))
        if back_after_run:
            _, run_stop = await asyncio.wait_for(driving, 30)
        else:
            await asyncio.sleep(0.5)  # batches go by with nobody subscribed for them
        tasks.append(asyncio.create_task(rec_b.serve(b_stop)))
        await rec_b.wait_ready()
        if not back_after_run:
            _, run_stop = await asyncio.wait_for(driving, 30)
        await _until(lambda: rec_b.stats.runs_complete >= 1, 30)
        seqs = store.seqs("gap")
        samples = store.sample_count("gap")
        _, stored_stop = store.run_documents("gap")
        ended = store.step_events("gap")
        await _until(lambda: not agent.spool or not agent.spool.batches("gap", 0, 10**6), 10)
    finally:
        agent_stop.set()
        b_stop.set()
        a_stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        store.close()
    assert run_stop.n_samples == CELL_S
    assert stored_stop is not None and stored_stop.last_seq == run_stop.last_seq
    assert seqs == list(range(run_stop.last_seq + 1)), "every seq exactly once"
    assert samples == CELL_S
    assert len(ended) == 1
    assert len(stored_by_a) < len(seqs), "recorder A must not have had the whole run (no gap was made)"
    assert rec_b.stats.resend_requests >= 1


async def test_a_recorder_back_mid_run_under_a_new_session_fills_the_gap(broker_url, unique_lab, tmp_path) -> None:
    await _record_with_a_gap(broker_url, unique_lab, tmp_path, back_after_run=False)


async def test_a_recorder_back_after_the_run_gets_its_tail_and_its_runstop(broker_url, unique_lab, tmp_path) -> None:
    """Nothing arrives to show the gap: the stored run without a RunStop is probed for its tail at the start."""
    await _record_with_a_gap(broker_url, unique_lab, tmp_path, back_after_run=True)


@pytest.mark.parametrize("back_after_run", [False, True])
async def test_in_a_signed_lab_the_agent_takes_the_recorders_resend_request(
    secured_lab,  # noqa: F811
    tmp_path,
    back_after_run: bool,
) -> None:
    """The ResendRequest is signed by the recorder identity, which policy lets give that one command."""
    async with EmbeddedBroker() as broker:
        conn = BrokerConnection.parse(broker.url, secured_lab.out / "security.yaml")
        await _record_with_a_gap(conn, "seclab", tmp_path, back_after_run=back_after_run, channel="ch1")


async def test_a_recorder_behind_its_store_sheds_batches_and_fetches_them_again(unique_lab, tmp_path) -> None:
    """Back-pressure without unbounded memory: past max_pending waiting documents the recorder drops batches
    (aiomqtt 2.5 cannot delay the acknowledgement), and gap filling fetches every one of them again."""
    async with EmbeddedBroker() as broker:
        store = Store.open(tmp_path / "store.db")
        write = store.write

        def slow_write(documents):  # a store slower than the agent at max speed (PostgreSQL far away)
            import time

            time.sleep(0.1)
            return write(documents)

        store.write = slow_write  # type: ignore[method-assign]
        stop = asyncio.Event()
        config = sim_lab(unique_lab, {"ch": "lco_lgps_glassy"}, Limits(voltage_min_V=1.9, voltage_max_V=3.8))
        built = build_channel("ch", config.channel("ch"), "config", unique_lab)
        agent = Agent(
            lab=unique_lab,
            channel="ch",
            driver=built.driver,
            clock=built.clock,
            broker_url=broker.url,
            channel_limits=config.channel("ch").limits,
            cell_id="c",
            batch_size=1,
            spool_dir=tmp_path / "spool",
        )
        recorder = Recorder(broker.url, store, unique_lab, max_batch=10, max_pending=100, resend_every_s=0.3)
        tasks = [asyncio.create_task(agent.serve(stop)), asyncio.create_task(recorder.serve(stop))]
        cmd = StepCommand(run_id="shed", step_index=0, step=StepKind.rest, end=EndConditions(time_s=300))
        try:
            await agent.wait_ready()
            await recorder.wait_ready()
            _, run_stop = await run_steps_by_hand(broker.url, unique_lab, "ch", "shed", [cmd])
            await _until(lambda: recorder.stats.runs_complete >= 1, 40)
            seqs = store.seqs("shed")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
            store.close()
    assert recorder.stats.shed > 0
    assert seqs == list(range(run_stop.last_seq + 1)) and run_stop.n_samples == 300


async def test_a_run_no_recorder_ever_heard_of_is_announced_by_its_agent_and_stored_whole(
    embedded_broker, unique_lab, tmp_path, monkeypatch
) -> None:
    """The case a recorder cannot ask about: it received a run's every document, RunStop included, and died before
    committing any (here: no recorder at all while the run ran). Its agent announces the spooled run's RunStop
    again until a recorder confirms the run whole (ADR 0013)."""
    monkeypatch.setattr("labtwin.agent.service.ANNOUNCE_EVERY_S", 0.5)
    store = Store.open(tmp_path / "store.db")
    agent_stop, rec_stop = asyncio.Event(), asyncio.Event()
    agent = _agent(unique_lab, embedded_broker.url, tmp_path / "spool")
    tasks = [asyncio.create_task(agent.serve(agent_stop))]
    cmd = StepCommand(run_id="unheard", step_index=0, step=StepKind.rest, end=EndConditions(time_s=CELL_S))
    try:
        await agent.wait_ready()
        _, run_stop = await asyncio.wait_for(
            run_steps_by_hand(embedded_broker.url, unique_lab, "ch", "unheard", [cmd]), 30
        )
        recorder = Recorder(embedded_broker.url, store, unique_lab, client_id=f"rec-{unique_lab}", resend_every_s=0.3)
        tasks.append(asyncio.create_task(recorder.serve(rec_stop)))
        await recorder.wait_ready()
        assert store.runs() == []  # the recorder starts knowing nothing of the run
        await _until(lambda: recorder.stats.runs_complete >= 1, 30)
        seqs = store.seqs("unheard")
        _, stored_stop = store.run_documents("unheard")
        await _until(lambda: agent.spool is not None and "unheard" not in agent.spool.run_ids(), 10)
    finally:
        agent_stop.set()
        rec_stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        store.close()
    assert stored_stop is not None and stored_stop.last_seq == run_stop.last_seq
    assert seqs == list(range(run_stop.last_seq + 1))
