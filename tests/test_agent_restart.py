"""A run that outlives its agent (issue 14): an agent started on a spool a killed agent left resumes the run.

The spool here is written as a killed agent leaves it (a RunStart, one step ended, one started and never ended,
batches of both; no RunStop), then a real agent serves on it through a real broker. The subprocess version, with
`kill -9` of a supervised agent on the 2450 emulator, is tests/integration/test_agent_restart.py.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labtwin import bus as busmod
from labtwin.agent import Agent
from labtwin.agent.recovery import rebuild_runs, step_stats_from_samples
from labtwin.agent.spool import Spool
from labtwin.bus import Bus
from labtwin.cli import app
from labtwin.cli.supervise import Backoff
from labtwin.cli.wiring import build_channel
from labtwin.data.store import Store
from labtwin.documents import (
    ChannelState,
    ChannelStatus,
    EndConditions,
    EndReason,
    Limits,
    Outage,
    ResumePoint,
    RunStart,
    RunStop,
    SampleBatch,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StepStats,
    StopRun,
    encode,
)
from tests.helpers import sim_lab, wait_doc

SPEED = 100.0


def _batch(run_id: str, seq: int, step: int, t0: float, n: int = 5) -> SampleBatch:
    times = [t0 + k for k in range(n)]
    return SampleBatch(
        run_id=run_id,
        channel="ch",
        seq=seq,
        time_s=times,
        voltage_V=[3.7] * n,
        current_A=[-1e-3 if step == 1 else 0.0] * n,
        capacity_Ah=[-1e-3 * (t - 10) / 3600 if step == 1 else 0.0 for t in times],
        temperature_C=[None] * n,
        step=[step] * n,
        cycle=[0] * n,
    )


def _killed_agents_spool(lab: str, directory: Path) -> Spool:
    """What an agent killed during step 1 of run "r" leaves: everything journalled, nothing stopped."""
    spool = Spool.for_channel(lab, "ch", directory)
    ev, data = busmod.topic(lab, "ch", "event"), busmod.topic(lab, "ch", "data")
    spool.append(ev, encode(RunStart(run_id="r", lab=lab, channel="ch", cell_id="c", protocol="p", n_steps=3)), "r")
    spool.append(ev, encode(StepEvent(run_id="r", channel="ch", step_index=0, step=StepKind.rest, event="started", time_s=0)), "r")  # fmt: skip
    spool.append(data, encode(_batch("r", 0, 0, 0.0)), "r", 0)
    spool.append(data, encode(_batch("r", 1, 0, 5.0)), "r", 1)
    rest_end = EndReason(kind="end_condition", name="time_s", value=10.0, threshold=10.0)
    spool.append(ev, encode(StepEvent(run_id="r", channel="ch", step_index=0, step=StepKind.rest, event="ended", time_s=10, reason=rest_end)), "r")  # fmt: skip
    spool.append(ev, encode(StepEvent(run_id="r", channel="ch", step_index=1, step=StepKind.cc, event="started", time_s=10)), "r")  # fmt: skip
    for seq in (2, 3, 4):
        spool.append(data, encode(_batch("r", seq, 1, 10.0 + 5 * (seq - 2))), "r", seq)
    spool.mark_handed([e.ident for e in spool.unhanded()])
    return spool


def _agent(lab: str, url: str, spool_dir: Path) -> Agent:
    config = sim_lab(lab, {"ch": "lco_lgps_glassy"}, Limits(voltage_min_V=1.9, voltage_max_V=4.3), speed=SPEED)
    built = build_channel("ch", config.channel("ch"), SPEED, lab)
    return Agent(
        lab=lab,
        channel="ch",
        driver=built.driver,
        clock=built.clock,
        broker_url=url,
        channel_limits=config.channel("ch").limits,
        cell_id="c",
        spool_dir=spool_dir,
    )


async def test_a_restarted_agent_resumes_the_run_from_its_spool_and_puts_the_outage_on_record(
    embedded_broker, unique_lab, tmp_path
):
    _killed_agents_spool(unique_lab, tmp_path / "spool").close()
    await asyncio.sleep(0.3)  # the outage: 0.3 s of wall time, 30 s of cell time at x100
    agent = _agent(unique_lab, embedded_broker.url, tmp_path / "spool")
    stop = asyncio.Event()
    async with Bus(embedded_broker.url) as bus:
        events = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
        status = await bus.subscribe(busmod.topic(unique_lab, "ch", "status"))
        serving = asyncio.create_task(agent.serve(stop))
        try:
            outage = await wait_doc(events, lambda d: isinstance(d, Outage))
            cut = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "ended")
            first = await wait_doc(status, lambda d: isinstance(d, ChannelStatus))
            cmd = busmod.topic(unique_lab, "ch", "cmd")
            # The flow's re-sent commands: the step that ended before the death, and the cut one.
            for index, kind, current_A in ((0, StepKind.rest, None), (1, StepKind.cc, -1e-3)):
                again = StepCommand(
                    run_id="r", step_index=index, step=kind, current_A=current_A, end=EndConditions(time_s=10)
                )
                await bus.publish(cmd, again)
            answered = [await wait_doc(events, lambda d: isinstance(d, StepEvent)) for _ in range(2)]
            rest = StepCommand(run_id="r", step_index=2, step=StepKind.rest, end=EndConditions(time_s=20))
            await bus.publish(cmd, rest)
            started = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.step_index == 2)
            ended = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.step_index == 2)
            await bus.publish(cmd, StopRun(run_id="r", exit_status="success"))
            run_stop = await wait_doc(events, lambda d: isinstance(d, RunStop))
            batches = agent.spool.batches("r", 0, 10**6) if agent.spool is not None else []
        finally:
            stop.set()
            await asyncio.wait_for(serving, 20)
    assert isinstance(outage, Outage) and outage.step_index == 1 and outage.from_time_s == 24.0
    assert 0.3 <= outage.wall_span_s < 10 and abs(outage.span_s - SPEED * outage.wall_span_s) < 1e-6
    assert outage.charge_Ah is None and not outage.charge_known
    assert isinstance(cut, StepEvent) and cut.step_index == 1 and cut.reason is not None
    assert (cut.reason.kind, cut.reason.name) == ("error", "agent_restart") and "unknown" in cut.reason.message
    assert cut.stats is not None and cut.stats.n_samples == 15 and cut.stats.first_seq == 2 and cut.stats.last_seq == 4
    assert cut.time_s == outage.to_time_s
    # Between steps, output off, waiting for its flow: the status names no run until the flow speaks (a flow that
    # resumes the run from the store then sends StartRun with its resume point, not only its next step).
    assert isinstance(first, ChannelStatus) and first.state is ChannelState.idle and first.run_id is None
    assert "run r resumed from the spool" in first.message and "step 1 cut" in first.message
    assert [(e.step_index, e.event, e.reason.name if e.reason else None) for e in answered] == [
        (0, "ended", "time_s"),
        (1, "ended", "agent_restart"),
    ], "steps of the run that ended are answered with their ends, never run again"
    assert isinstance(started, StepEvent) and started.event == "started" and started.time_s == outage.to_time_s
    assert isinstance(ended, StepEvent) and ended.reason is not None and ended.reason.name == "time_s"
    assert ended.stats is not None and ended.stats.first_seq == 5, "the batches go on numbering after the spool's"
    assert isinstance(run_stop, RunStop) and run_stop.n_samples == 25 + ended.stats.n_samples
    assert run_stop.last_seq == max(e.seq or 0 for e in batches) and [e.seq for e in batches] == list(
        range(run_stop.last_seq + 1)
    )


async def test_a_run_whose_agent_died_long_ago_gives_way_to_a_new_run_and_is_closed_as_aborted(
    embedded_broker, unique_lab, tmp_path
):
    spool = _killed_agents_spool(unique_lab, tmp_path / "spool")
    spool._db.execute("UPDATE entries SET created_s = created_s - 3600")  # the agent died an hour ago
    spool.close()
    agent = _agent(unique_lab, embedded_broker.url, tmp_path / "spool")
    stop = asyncio.Event()
    async with Bus(embedded_broker.url) as bus:
        events = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
        serving = asyncio.create_task(agent.serve(stop))
        try:
            outage = await wait_doc(events, lambda d: isinstance(d, Outage))
            await bus.publish(
                busmod.topic(unique_lab, "ch", "cmd"),
                StartRun(run_id="r2", channel="ch", cell_id="c", protocol="p", n_steps=1),
            )
            run_stop = await wait_doc(events, lambda d: isinstance(d, RunStop))
            new_start = await wait_doc(events, lambda d: isinstance(d, RunStart))
        finally:
            stop.set()
            await asyncio.wait_for(serving, 20)
    assert isinstance(outage, Outage) and outage.wall_span_s >= 3600
    assert isinstance(run_stop, RunStop) and run_stop.run_id == "r" and run_stop.exit_status == "aborted"
    assert "abandoned" in run_stop.reason
    assert (run_stop.n_samples, run_stop.n_batches, run_stop.last_seq) == (25, 5, 4)
    assert isinstance(new_start, RunStart) and new_start.run_id == "r2" and new_start.first_seq == 0


async def test_a_flow_that_resumes_the_run_runs_the_cut_step_again_and_the_store_keeps_its_real_end(
    embedded_broker, unique_lab, tmp_path
):
    """The flow's decision: StartRun with a resume point (what `campaign run` sends after reading the store) takes
    the rebuilt run on; the cut step runs again with its charge so far carried, and its end replaces the cut one
    in the store (the outage, naming the step, stays)."""
    _killed_agents_spool(unique_lab, tmp_path / "spool").close()
    agent = _agent(unique_lab, embedded_broker.url, tmp_path / "spool")
    store = Store.open(tmp_path / "store.db")
    stop = asyncio.Event()
    cmd = busmod.topic(unique_lab, "ch", "cmd")
    async with Bus(embedded_broker.url) as bus:
        events = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
        serving = asyncio.create_task(agent.serve(stop))
        try:
            outage = await wait_doc(events, lambda d: isinstance(d, Outage))
            cut = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "ended")
            store.write([outage, cut])
            carried = StepStats(duration_s=14.0, discharge_Ah=4e-6, n_samples=15, first_seq=2, last_seq=4)
            point = ResumePoint(next_seq=3, time_s=24.0, n_samples=25, step_index=1, step_stats=carried)
            await bus.publish(
                cmd, StartRun(run_id="r", channel="ch", cell_id="c", protocol="p", n_steps=3, resume=point)
            )
            start = await wait_doc(events, lambda d: isinstance(d, RunStart))
            step = StepCommand(run_id="r", step_index=1, step=StepKind.cc, current_A=-1e-4, end=EndConditions(time_s=5))
            await bus.publish(cmd, step)
            started = await wait_doc(events, lambda d: isinstance(d, StepEvent))
            ended = await wait_doc(events, lambda d: isinstance(d, StepEvent))
            store.write([started, ended])
            stored = store.step_events("r")
            stored_outages = store.outages("r")
        finally:
            stop.set()
            await asyncio.wait_for(serving, 20)
            store.close()
    assert isinstance(start, RunStart) and start.first_seq == 5, "the higher of the spool's and the store's"
    assert isinstance(started, StepEvent) and started.event == "started" and started.step_index == 1
    assert isinstance(ended, StepEvent) and ended.reason is not None and ended.reason.name == "time_s"
    assert ended.stats is not None and ended.stats.first_seq == 2 and ended.stats.n_samples > 15, "carried"
    assert [(e.step_index, e.reason.name if e.reason else None) for e in stored] == [(1, "time_s")]
    assert [o.step_index for o in stored_outages] == [1]


def test_a_cut_steps_statistics_come_from_its_recorded_samples() -> None:
    rows: list[tuple[float, float | None, float | None, int]] = [
        (10.0, 3.0, -3.6, 2),
        (11.0, None, None, 2),
        (12.0, 2.0, -3.6, 3),
    ]
    stats = step_stats_from_samples(rows, start_time_s=9.0)
    # 3.6 A: 1 mAh per second; from the step's start (9 s) to 12 s: 3 mAh out, the NaN reading bridged
    assert abs(stats.discharge_Ah - 3e-3) < 1e-12 and stats.charge_Ah == 0
    assert (stats.n_samples, stats.first_seq, stats.last_seq, stats.duration_s) == (2, 2, 3, 3.0)
    assert (stats.start_voltage_V, stats.end_voltage_V, stats.end_current_A) == (3.0, 2.0, -3.6)


def test_the_supervisors_back_off_doubles_to_its_bound_and_resets_after_a_healthy_run() -> None:
    b = Backoff()
    assert [b.after(2.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.after(61.0) == 1 and b.after(0.5) == 2


def test_labtwin_runs_shows_a_runs_outages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path / "s.db")
    start = RunStart(run_id="r-out", lab="l", channel="ch", cell_id="c", protocol="p", n_steps=1)
    when = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    outage = Outage(
        run_id="r-out",
        channel="ch",
        from_time_s=5.0,
        to_time_s=65.0,
        span_s=60.0,
        wall_from=when,
        wall_to=when,
        wall_span_s=60.0,
    )
    store.write([start, outage, outage])  # a re-delivered outage is stored once
    assert [o.span_s for o in store.outages("r-out")] == [60.0]
    store.close()
    # Wide enough that no cell wraps, whichever width the CLI's console took when it was imported (rich fixes it
    # then, from COLUMNS or the terminal: CI's is 80).
    import labtwin.cli

    monkeypatch.setattr(labtwin.cli.console, "width", 220)
    shown = CliRunner().invoke(app, ["runs", "--store", str(tmp_path / "s.db")])
    assert shown.exit_code == 0, shown.output
    assert "outages" in shown.output and "1 (60 s)" in shown.output, shown.output


def test_only_runs_without_a_run_stop_are_rebuilt(tmp_path: Path) -> None:
    spool = _killed_agents_spool("l", tmp_path)
    ev = busmod.topic("l", "ch", "event")
    spool.append(
        ev, encode(RunStart(run_id="done", lab="l", channel="ch", cell_id="c", protocol="p", n_steps=1)), "done"
    )
    spool.append(ev, encode(RunStop(run_id="done", channel="ch", exit_status="success", reason="run_stop")), "done")
    found = rebuild_runs(spool)
    spool.close()
    assert [r.run.run_id for r in found] == ["r"]
    r = found[0]
    assert (r.run.next_seq, r.run.n_samples, r.run.n_batches, r.last_sample_time_s) == (5, 25, 5, 24.0)
    assert sorted(r.run.ended) == [0] and r.cut is not None and r.cut.step_index == 1


def test_under_a_supervisor_only_a_broker_or_instrument_not_answering_is_worth_a_restart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from labtwin.agent.spool import SpoolBusy
    from labtwin.bus.client import BrokerRefused, BrokerUnreachable
    from labtwin.cli.errors import EXIT_CONFIG, EXIT_USER_ERROR, SUPERVISED_ENV, _supervised_code
    from labtwin.instruments.transport import InstrumentTimeout

    timeout = InstrumentTimeout("no answer")
    assert _supervised_code(timeout, EXIT_USER_ERROR) == EXIT_USER_ERROR  # not supervised: the documented 2
    monkeypatch.setenv(SUPERVISED_ENV, "1")
    assert _supervised_code(timeout, EXIT_USER_ERROR) == EXIT_USER_ERROR  # a subclass of InstrumentError
    assert _supervised_code(BrokerUnreachable("down"), EXIT_USER_ERROR) == EXIT_USER_ERROR
    assert _supervised_code(BrokerRefused("bad password"), EXIT_USER_ERROR) == EXIT_CONFIG
    assert _supervised_code(SpoolBusy("held"), EXIT_USER_ERROR) == EXIT_CONFIG
