"""A run id names one run: once it ended, the agent runs none of its steps and starts it again only to resume it.

Found by a newcomer's trial on an unsigned lab: a StopRun from someone else mid-run ended the run ("success,
forged"); the flow asked for its next step, the agent started the run again on the step's word at cell time 0
with its sequence numbers from 0, the store kept 582 conflicting batches, and `labtwin run` said success."""

from __future__ import annotations

import pytest

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.cli.wiring import LocalLab
from labtwin.documents import (
    ChannelStatus,
    EndConditions,
    RunStart,
    RunStop,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StopRun,
)
from tests.helpers import run_steps_by_hand, sim_lab, wait_doc


def _rest(run_id: str, index: int) -> StepCommand:
    return StepCommand(
        run_id=run_id, step_index=index, step=StepKind.rest, end=EndConditions(time_s=60), sample_interval_s=10
    )


async def test_an_ended_runs_step_and_start_are_refused_and_answered_with_how_it_ended(
    broker_url, unique_lab, tmp_path
):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        _, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "done", [_rest("done", 0)])
        assert stop.exit_status == "success"
        async with Bus(local.url) as bus:
            events = await bus.subscribe(
                [busmod.topic(unique_lab, "ch", "event"), busmod.topic(unique_lab, "ch", "status")]
            )
            cmd = busmod.topic(unique_lab, "ch", "cmd")
            await bus.publish(cmd, _rest("done", 1))
            ended = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.step_index == 1)
            assert ended.event == "ended" and ended.reason.name == "run_ended", ended
            assert "already ended (success" in ended.reason.message
            again = await wait_doc(events, lambda d: isinstance(d, RunStop) and d.run_id == "done")
            assert again.last_seq == stop.last_seq  # how it ended, said again; nothing new

            await bus.publish(cmd, StartRun(run_id="done", channel="ch", cell_id="c", protocol="p", n_steps=1))
            refused = await wait_doc(
                events, lambda d: isinstance(d, ChannelStatus) and d.message.startswith("refused run done")
            )
            assert "already ended" in refused.message and refused.run_id is None

            # A step of a run no StartRun announced is not run either (nor is a run started on its word).
            await bus.publish(cmd, _rest("never-started", 0))
            unknown = await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.run_id == "never-started")
            assert unknown.reason.name == "unknown_run" and unknown.stats.n_samples == 0
        await local.wait_stored("done")
        runs = {r.run_id: r for r in local.store.runs()}
    assert set(runs) == {"done"}  # no RunStart for the refused ones
    assert runs["done"].stored_samples == runs["done"].reported_samples == stop.n_samples
    assert not runs["done"].conflicts


@pytest.mark.usefixtures("prefect_api")
async def test_a_stop_from_outside_the_flow_fails_the_run_and_writes_no_second_record(broker_url, unique_lab, tmp_path):
    from labtwin.orchestration.flows import run_protocol

    proto = tmp_path / "slow.yaml"
    proto.write_text(
        "metadata: {name: three rests}\nrecord: {interval_s: 10}\n"
        "safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}\nmethod:\n"
        "  - rest: {duration_s: 200}\n  - rest: {duration_s: 200}\n  - rest: {duration_s: 200}\n"
    )
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, speed=100)  # each rest 2 s of wall time
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        async with Bus(local.url) as intruder:
            events = await intruder.subscribe(busmod.topic(unique_lab, "ch", "event"))
            import asyncio

            flow = asyncio.create_task(run_protocol(str(proto), "ch", local.url, lab=unique_lab, run_id="r-forged"))
            await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == "r-forged")
            await intruder.publish(
                busmod.topic(unique_lab, "ch", "cmd"),
                StopRun(run_id="r-forged", exit_status="success", reason="forged: all fine"),
            )
            summary = await asyncio.wait_for(flow, 60)
        await local.wait_stored("r-forged")
        runs = {r.run_id: r for r in local.store.runs()}
    assert summary.exit_status != "success", summary
    assert "forged: all fine" in summary.reason  # what the agent's record says, beside why the flow failed
    run = runs["r-forged"]
    assert not run.conflicts and run.stored_samples == run.reported_samples
