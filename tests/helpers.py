"""Test helpers: a lab of simulated channels and a way to drive an agent by hand over the bus."""

from __future__ import annotations

import asyncio
import os
import signal

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.documents import Limits, RunStart, RunStop, StartRun, StepCommand, StepEvent, StopRun


def sim_lab(lab: str, cells: dict[str, str], limits: Limits | None = None, speed="max") -> LabConfig:
    return LabConfig(
        lab=lab,
        channels={
            ch: ChannelConfig(
                driver="simulated",
                cell=cell,
                cell_id=f"{ch}-cell",
                speed=speed,
                seed=7,
                limits=limits or Limits(voltage_min_V=0.1, voltage_max_V=4.0),
            )
            for ch, cell in cells.items()
        },
    )


async def wait_doc(sub, predicate, timeout_s: float = 30.0):
    async def _wait():
        while True:
            msg = await sub.get()
            if predicate(msg.document):
                return msg.document

    return await asyncio.wait_for(_wait(), timeout_s)


async def run_steps_by_hand(
    url: str,
    lab: str,
    channel: str,
    run_id: str,
    commands: list[StepCommand],
    stop_status: str = "success",
    step_timeout_s: float = 30.0,
) -> tuple[list[StepEvent], RunStop]:
    """Drive an agent without Prefect: StartRun, the steps one by one (each within ``step_timeout_s``), StopRun."""
    async with Bus(url) as bus:
        sub = await bus.subscribe(busmod.topic(lab, channel, "event"))
        cmd_topic = busmod.topic(lab, channel, "cmd")
        await bus.publish(
            cmd_topic, StartRun(run_id=run_id, channel=channel, cell_id="c", protocol="p", n_steps=len(commands))
        )
        await wait_doc(sub, lambda d: isinstance(d, RunStart) and d.run_id == run_id)
        ended = []
        for cmd in commands:
            await bus.publish(cmd_topic, cmd)
            ev = await wait_doc(
                sub,
                lambda d, i=cmd.step_index: isinstance(d, StepEvent) and d.event == "ended" and d.step_index == i,
                step_timeout_s,
            )
            ended.append(ev)
        await bus.publish(cmd_topic, StopRun(run_id=run_id, exit_status=stop_status))
        stop = await wait_doc(sub, lambda d: isinstance(d, RunStop) and d.run_id == run_id)
    return ended, stop


def kill_process_group(pid: int) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything it started.

    Killing only the process leaves its children running: a `labtwin campaign run` has a Prefect server
    (uvicorn) that PID 1 adopts and that serves on after the suite. A power cut takes them all, and so does this.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already
        pass
