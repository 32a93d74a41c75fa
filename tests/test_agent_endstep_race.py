"""An EndStep is never lost: raced against its step's start, it ends that step with the reason it asked for.

The flow sends EndStep (the twin's state of charge reached a target) on the same cmd topic as the steps,
so it can arrive before its StepCommand, while that command waits in the agent's queue, just as the step
thread starts, or mid-step. Once, an EndStep that arrived between the agent handing the step to its
thread and the thread resetting its end request was dropped, and the step ran on to its time limit.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

from labtwin import bus as busmod
from labtwin.agent.control import StepControl
from labtwin.bus import Bus
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.wiring import LocalLab
from labtwin.documents import (
    EndConditions,
    EndReason,
    EndStep,
    Limits,
    RunStart,
    RunStop,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StopRun,
)
from tests.helpers import sim_lab, wait_doc

LONG_REST_S = 36_000.0  # the step's own end: 36 s of wall time at speed 1000, far beyond any EndStep's delay


def _rest(run_id: str, index: int, time_s: float = LONG_REST_S) -> StepCommand:
    return StepCommand(
        run_id=run_id, step_index=index, step=StepKind.rest, end=EndConditions(time_s=time_s), sample_interval_s=1.0
    )


def _reason(index: int) -> EndReason:
    return EndReason(kind="end_condition", name="twin_soc", value=0.5, threshold=0.5, message=f"race {index}")


# ---------------------------------------------------------------------- the shared object, thread against thread


def _request_after(
    control: StepControl, barrier: threading.Barrier, spin: int, index: int, accepted: list[bool]
) -> None:
    barrier.wait()
    for _ in range(spin):  # a varied moment around the step's start
        pass
    accepted.append(control.request_end("r", index, _reason(index)))


def test_an_end_request_raced_against_the_step_start_always_reaches_that_step() -> None:
    control = StepControl()
    control.begin_run("r")
    rng = random.Random(12)
    for index in range(2000):
        barrier = threading.Barrier(2)
        accepted: list[bool] = []
        sender = threading.Thread(
            target=_request_after, args=(control, barrier, rng.randrange(0, 400), index, accepted)
        )
        sender.start()
        barrier.wait()
        control.begin_step(_rest("r", index))
        sender.join(5)
        # The step thread's first sample after the request (whichever came first) sees it.
        assert accepted == [True]
        assert control.end_requested(index) == _reason(index), f"step {index}: the EndStep was lost"
        control.end_step()


def test_an_end_request_for_a_step_that_already_ran_or_another_run_is_ignored() -> None:
    control = StepControl()
    control.begin_run("r")
    control.begin_step(_rest("r", 0))
    control.end_step()
    assert control.request_end("r", 0, _reason(0)) is False  # step 0 is over: too late
    control.begin_step(_rest("r", 1))
    assert control.end_requested(1) is None
    assert control.request_end("other", 1, _reason(1)) is False  # a stale flow's run while this one's step runs
    assert control.end_requested(1) is None
    # A request for a later step waits for it, and does not end the step running now.
    assert control.request_end("r", 2, _reason(2)) is True
    assert control.end_requested(1) is None
    control.end_step()
    control.begin_step(_rest("r", 2))
    assert control.end_requested(2) == _reason(2)
    control.end_step()
    # A new run forgets the old run's requests, keeps its own that came before its StartRun.
    assert control.request_end("r", 3, _reason(3)) is True
    control.begin_run("next")
    assert control.request_end("next", 0, _reason(0)) is True
    control.begin_run("next")  # a repeated StartRun (QoS 1 duplicate)
    control.begin_step(_rest("next", 0))
    assert control.end_requested(0) == _reason(0)
    control.end_step()
    control.begin_run("r")
    control.begin_step(_rest("r", 3))
    assert control.end_requested(3) is None


# ---------------------------------------------------------------------- a real agent on the embedded broker

# How the EndStep is timed against its StepCommand: before it, straight after it (no await between), after
# a few milliseconds (while the command waits in the queue or the step thread starts), after "started".
MOMENTS = ("before", "after", "after_ms", "after_started")


async def test_every_step_ends_with_the_requested_reason_whenever_its_end_step_arrives(
    embedded_broker: EmbeddedBroker, unique_lab: str, tmp_path: Path
) -> None:
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0), speed=1000)
    rng = random.Random(3)
    n_steps = 48
    run_id = "race"
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db"), record=False) as local:
        async with Bus(local.url) as bus:
            sub = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
            cmd_topic = busmod.topic(unique_lab, "ch", "cmd")
            await bus.publish(
                cmd_topic, StartRun(run_id=run_id, channel="ch", cell_id="c", protocol="race", n_steps=n_steps)
            )
            await wait_doc(sub, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
            started_wall = time.monotonic()
            ended: list[StepEvent] = []
            for index in range(n_steps):
                moment = MOMENTS[index % len(MOMENTS)]
                step, end = _rest(run_id, index), EndStep(run_id=run_id, step_index=index, reason=_reason(index))
                if moment == "before":
                    await bus.publish(cmd_topic, end)
                    await bus.publish(cmd_topic, step)
                else:
                    await bus.publish(cmd_topic, step)
                    if moment == "after_ms":
                        await asyncio.sleep(rng.uniform(0.0, 0.02))
                    elif moment == "after_started":
                        await wait_doc(
                            sub,
                            lambda d, i=index: isinstance(d, StepEvent) and d.event == "started" and d.step_index == i,
                            timeout_s=10,
                        )
                    await bus.publish(cmd_topic, end)
                try:
                    event = await wait_doc(
                        sub,
                        lambda d, i=index: isinstance(d, StepEvent) and d.event == "ended" and d.step_index == i,
                        timeout_s=10,  # a lost EndStep leaves the rest running for its 36 s
                    )
                except TimeoutError:
                    await bus.publish(cmd_topic, StopRun(run_id=run_id, exit_status="aborted", reason="test failed"))
                    pytest.fail(f"step {index}: the EndStep sent {moment.replace('_', ' ')} its StepCommand was lost")
                ended.append(event)
            # An EndStep for a step that already ended does not end the next one: that step runs to its own end.
            await bus.publish(cmd_topic, EndStep(run_id=run_id, step_index=n_steps - 1, reason=_reason(n_steps - 1)))
            await bus.publish(cmd_topic, _rest(run_id, n_steps, time_s=5.0))
            last = await wait_doc(
                sub, lambda d: isinstance(d, StepEvent) and d.event == "ended" and d.step_index == n_steps, timeout_s=10
            )
            await bus.publish(cmd_topic, StopRun(run_id=run_id))
            await wait_doc(sub, lambda d: isinstance(d, RunStop) and d.run_id == run_id)
            wall_s = time.monotonic() - started_wall
    lost = [
        (e.step_index, MOMENTS[e.step_index % len(MOMENTS)], e.reason)
        for e in ended
        if e.reason != _reason(e.step_index)
    ]
    assert not lost, f"EndSteps lost or misapplied: {lost}"
    assert all(e.stats and e.stats.duration_s < LONG_REST_S for e in ended)
    assert last.reason is not None and last.reason.name == "time_s"
    assert wall_s < 60
