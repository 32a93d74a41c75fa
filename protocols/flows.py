"""Prefect flows that run protocols: one task run per step, every command over MQTT.

The flow never touches an instrument. It publishes a StepCommand to the
channel's cmd topic and waits for the agent's StepEvent "ended"; the agent
enforces safety on every sample whatever the flow does (Prefect's
cancellation hooks are not reliable enough to carry safety: Prefect issues
#15912, #17259). A step's timeout derives from its own time bound at the
channel's speed, and a channel that goes silent or offline fails the step
at once instead of waiting that long.

Flows are ``async def``: further async flow runs in one process cost ~0.15 s,
sync ones ~1.1 s (DESIGN.md).
"""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import asyncio  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import get_run_context  # noqa: E402

from labtwin import bus as busmod  # noqa: E402
from labtwin.bus import Bus, Subscription  # noqa: E402
from labtwin.models import (  # noqa: E402
    ChannelState,
    ChannelStatus,
    RunStart,
    RunStop,
    StartRun,
    StepCommand,
    StepEvent,
    StopRun,
)
from labtwin.summary import RunSummary, summarize_run  # noqa: E402
from protocols.compile import CompileContext, compile_protocol  # noqa: E402
from protocols.model import load_protocol, resolve_protocol_path  # noqa: E402

STATUS_WAIT_S = 10.0
STALL_MIN_S = 60.0
TIMEOUT_GRACE_S = 30.0


class ChannelUnavailable(RuntimeError):
    pass


class StepTimeout(TimeoutError):
    pass


@dataclass
class ChannelLink:
    """The flow's view of one channel: its bus, its event and status stream, its last status."""

    bus: Bus
    lab: str
    channel: str
    stream: Subscription
    status: ChannelStatus | None = None
    last_heard: float = field(default_factory=time.monotonic)
    events: list[StepEvent] = field(default_factory=list)

    def topic(self, kind: str) -> str:
        return busmod.topic(self.lab, self.channel, kind)

    async def next_document(self, timeout_s: float):
        """The next event or status document; status updates are absorbed here."""
        msg = await self.stream.get(timeout_s)
        self.last_heard = time.monotonic()
        doc = msg.document
        if isinstance(doc, ChannelStatus):
            self.status = doc
            if doc.state is ChannelState.offline:
                raise ChannelUnavailable(f"channel {self.channel} went offline: {doc.message or 'agent gone'}")
        return doc

    async def wait_for(self, predicate, timeout_s: float, stall_s: float, what: str):
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if self.status is not None and self.status.state is ChannelState.paused:
                deadline += now - last  # a paused run is waiting for a person, not late
            last = now
            if now >= deadline:
                raise StepTimeout(f"channel {self.channel}: no {what} within {timeout_s:.0f} s")
            if now - self.last_heard > stall_s:
                raise StepTimeout(f"channel {self.channel}: silent for {stall_s:.0f} s while waiting for {what}")
            try:
                doc = await self.next_document(min(deadline - now, stall_s, 1.0))
            except asyncio.TimeoutError:
                continue
            if predicate(doc):
                return doc


async def start_prefect_api() -> None:
    """Make sure Prefect's API answers before any MQTT client exists in this process.

    With no PREFECT_API_URL, Prefect starts its ephemeral local server on the
    first client, and that start blocks the calling event loop (8.5 s measured
    here): long enough to time out a Bus that is connecting and to miss MQTT
    keepalives. Starting it first makes the stall harmless.
    """
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        await client.hello()


def step_timeout_s(cmd: StepCommand, speed: float | None) -> float:
    """Wall seconds a step may take: its own time bound at the channel's speed (as-fast-as-possible
    channels are assumed no slower than real time), plus a grace for start-up and transport."""
    return cmd.time_budget_s() / (speed or 1.0) + TIMEOUT_GRACE_S


@task(name="step", task_run_name="{label}", cache_policy=NO_CACHE)
async def run_step(link: ChannelLink, command: StepCommand, label: str) -> StepEvent:
    """Publish one step and wait until the agent says it ended (with the reason and the step's stats)."""
    speed = link.status.speed if link.status else 1.0
    stall_s = max(STALL_MIN_S, 5 * command.sample_interval_s / (speed or 1e9))
    await link.bus.publish(link.topic("cmd"), command)
    ended = await link.wait_for(
        lambda d: isinstance(d, StepEvent) and d.event == "ended" and d.run_id == command.run_id
        and d.step_index == command.step_index,
        step_timeout_s(command, speed), stall_s, f"end of step {command.step_index} ({command.label})",
    )
    link.events.append(ended)
    return ended


async def _connect_channel(bus: Bus, lab: str, channel: str) -> ChannelLink:
    stream = await bus.subscribe([busmod.topic(lab, channel, "event"), busmod.topic(lab, channel, "status")])
    link = ChannelLink(bus, lab, channel, stream)
    deadline = time.monotonic() + STATUS_WAIT_S
    while link.status is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChannelUnavailable(
                f"no agent answers on channel {channel!r} of lab {lab!r} at {bus.address}: "
                f"start one with `labtwin agent --channel {channel}`"
            )
        try:
            await link.next_document(remaining)
        except asyncio.TimeoutError:
            pass
    if link.status.state is ChannelState.running and link.status.run_id:
        raise ChannelUnavailable(f"channel {channel} is busy with run {link.status.run_id}")
    return link


@flow(name="run_protocol", flow_run_name="{channel}: {protocol}", log_prints=False)
async def run_protocol(
    protocol: str,
    channel: str,
    broker_url: str,
    lab: str = "default",
    run_id: str | None = None,
    cell_id: str | None = None,
) -> RunSummary:
    """Run a protocol file on one channel's agent and return the run's summary."""
    wall_start = time.monotonic()
    path = resolve_protocol_path(protocol)
    proto = load_protocol(path)
    run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{channel}-{uuid.uuid4().hex[:6]}"
    try:
        flow_run_id = str(get_run_context().flow_run.id)
    except Exception:  # pragma: no cover - outside a flow run
        flow_run_id = None
    async with Bus(broker_url, f"flow-{run_id}") as bus:
        link = await _connect_channel(bus, lab, channel)
        commands = compile_protocol(
            proto,
            CompileContext(run_id, link.status.nominal_capacity_Ah, link.status.limits),
        )
        cell = cell_id or link.status.cell_id or ""
        await bus.publish(
            link.topic("cmd"),
            StartRun(run_id=run_id, channel=channel, cell_id=cell, protocol=proto.metadata.name,
                     n_steps=len(commands), flow_run_id=flow_run_id,
                     metadata={"anomaly_policy": json.dumps(proto.anomalies)} if proto.anomalies else {}),
        )
        await link.wait_for(lambda d: isinstance(d, RunStart) and d.run_id == run_id, 30, 30, "run start")
        exit_status, reason = "success", ""
        try:
            for cmd in commands:
                ended = await run_step(link, cmd, label=f"{cmd.step_index:03d} c{cmd.cycle} {cmd.label}")
                if ended.reason is None or ended.reason.kind != "end_condition":
                    exit_status = "failed" if ended.reason and ended.reason.kind in {"safety_limit", "error"} else "aborted"
                    reason = f"step {cmd.step_index}: {ended.reason.kind}:{ended.reason.name}" if ended.reason else ""
                    break
        except BaseException as exc:
            exit_status, reason = "aborted", f"{type(exc).__name__}: {exc}"
            await bus.publish(link.topic("cmd"), StopRun(run_id=run_id, exit_status="aborted", reason=reason))
            await bus.flush(5)
            raise
        await bus.publish(link.topic("cmd"), StopRun(run_id=run_id, exit_status=exit_status, reason=reason))
        stop = await link.wait_for(lambda d: isinstance(d, RunStop) and d.run_id == run_id, 30, 30, "run stop")
    return summarize_run(
        run_id, channel, link.events, cell_id=cell, protocol=proto.metadata.name,
        exit_status=stop.exit_status, reason=stop.reason or reason, wall_time_s=time.monotonic() - wall_start,
    )
