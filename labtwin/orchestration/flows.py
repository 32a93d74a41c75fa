"""Prefect flows that run protocols: one task run per step, every command over MQTT.

The flow never touches an instrument. It publishes a StepCommand to the
channel's cmd topic and waits for the agent's StepEvent "ended"; the agent
enforces safety on every sample whatever the flow does (Prefect's
cancellation hooks are not reliable enough to carry safety: Prefect issues
#15912, #17259). A step's timeout derives from its own time bound at the
channel's speed, and a channel that stays silent or offline past a grace period fails the step
instead of waiting that long.

A broker restart ends no run (issue 14): an agent's "offline" (its last will, sent when the broker or the
network drops it) starts a grace period instead of failing the step, and whenever the flow's own
connection comes back, or the agent comes back online, or the agent's status says the awaited step is
over, the flow asks the agent where the step stands by sending the step again. The agent never runs a
step index twice: it answers with how the step ended, or runs it on if it is still running.

Flows are ``async def``: further async flow runs in one process cost ~0.15 s,
sync ones ~1.1 s (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Final, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.utilities.annotations import quote

from labtwin import bus as busmod
from labtwin.analysis.summary import RunSummary, summarize_run
from labtwin.bus import Bus, Subscription
from labtwin.documents import (
    CellState,
    ChannelState,
    ChannelStatus,
    EndConditions,
    EndReason,
    EndStep,
    PauseRun,
    ResumePoint,
    RunStart,
    RunStop,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StepStats,
    StopRun,
)
from labtwin.orchestration.prefect_env import use_prefect_defaults
from labtwin.orchestration.resume import ResumeState
from labtwin.protocols.compile import CompileContext, compile_program
from labtwin.protocols.model import load_protocol, resolve_protocol_path
from labtwin.protocols.program import Interpreter
from labtwin.security import BrokerConnection, as_identity

log = logging.getLogger(__name__)

STATUS_WAIT_S = 10.0
STALL_MIN_S = 60.0
TIMEOUT_GRACE_S = 30.0
OFFLINE_GRACE_S = 120.0
"""How long an agent may be offline before its step fails: a broker restart, a supervised agent's restart or
a network drop of the agent's PC is back within seconds; a dead PC is not back in two minutes."""


class ChannelUnavailable(RuntimeError):
    pass


class ChannelBusy(ChannelUnavailable):
    """The channel's agent holds another run (its lease): wait until it is idle and try again."""


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
    cell_id: str = ""
    offline_since: float | None = None
    """When the agent's status last turned offline (monotonic), until it comes back."""
    resync_wanted: bool = False
    """Something happened after which the agent should be asked where the awaited step stands."""
    reconnects_seen: int = 0
    resyncs: int = 0
    """How often this link asked the agent again (a figure for tests and logs)."""

    def topic(self, kind: str) -> str:
        return busmod.topic(self.lab, self.channel, kind)

    @property
    def known_status(self) -> ChannelStatus:
        """The channel's last status: a link is handed out only once one arrived (_connect_channel waits)."""
        if self.status is None:
            raise ChannelUnavailable(f"channel {self.channel}: no status from its agent yet")
        return self.status

    async def next_document(self, timeout_s: float):
        """The next event or status document; status updates are absorbed here."""
        msg = await self.stream.get(timeout_s)
        self.last_heard = time.monotonic()
        doc = msg.document
        if isinstance(doc, ChannelStatus):
            was_offline = self.status is not None and self.status.state is ChannelState.offline
            self.status = doc
            if doc.state is ChannelState.offline:
                if self.offline_since is None:
                    self.offline_since = time.monotonic()
                    log.warning(
                        "channel %s went offline (%s): waiting up to %.0f s for its agent",
                        self.channel,
                        doc.message or "agent gone",
                        OFFLINE_GRACE_S,
                    )
            elif was_offline or self.offline_since is not None:
                log.info("channel %s is back (%s)", self.channel, doc.state.value)
                self.offline_since = None
                self.resync_wanted = True
        return doc

    def _check_offline(self, what: str) -> None:
        if self.offline_since is not None and time.monotonic() - self.offline_since > OFFLINE_GRACE_S:
            message = self.status.message if self.status is not None else ""
            raise ChannelUnavailable(
                f"channel {self.channel} went offline ({message or 'agent gone'}) and was not back within "
                f"{OFFLINE_GRACE_S:.0f} s while waiting for {what}: start its agent (`labtwin agent --channel "
                f"{self.channel}`) and resume the run (`labtwin run --resume RUN_ID`)"
            )

    async def wait_for(self, predicate, timeout_s: float, stall_s: float, what: str, ask=None):
        """The first document ``predicate`` accepts, reading status updates on the way.

        ``ask`` (a command) is sent again whenever the agent should be asked where things stand: after this
        flow's connection came back (events are not retained: one sent while it was away is gone), after the
        agent came back online, or when the agent's status says the step is no longer running. Time spent
        paused or offline does not count against ``timeout_s``: a paused run waits for a person, an offline
        agent has OFFLINE_GRACE_S to come back."""
        deadline = time.monotonic() + timeout_s
        last = time.monotonic()
        asked_in_silence = False
        while True:
            now = time.monotonic()
            waiting = self.status is not None and self.status.state in (ChannelState.paused, ChannelState.offline)
            if waiting:
                deadline += now - last  # a paused run is waiting for a person, an offline one for its agent
            last = now
            self._check_offline(what)
            if now >= deadline:
                raise StepTimeout(f"channel {self.channel}: no {what} within {timeout_s:.0f} s")
            if self.offline_since is None and now - self.last_heard > stall_s:
                raise StepTimeout(f"channel {self.channel}: silent for {stall_s:.0f} s while waiting for {what}")
            if now - self.last_heard > stall_s / 2 and self.offline_since is None and not asked_in_silence:
                asked_in_silence = self.resync_wanted = True  # half the stall bound with no word: ask once
            elif now - self.last_heard <= stall_s / 2:
                asked_in_silence = False
            reconnects = self.bus.stats.reconnects
            if reconnects != self.reconnects_seen:
                self.reconnects_seen = reconnects
                self.resync_wanted = True
            if ask is not None and self.resync_wanted and self.offline_since is None:
                self.resync_wanted = False
                self.resyncs += 1
                log.info("channel %s: asking its agent where things stand (%s)", self.channel, what)
                await self.bus.publish(self.topic("cmd"), ask)
            try:
                doc = await self.next_document(min(max(deadline - now, 0.01), stall_s, 1.0))
            except TimeoutError:
                continue
            if predicate(doc):
                return doc


def begin_prefect_api() -> None:
    """Start Prefect's local API (if no API is configured) without waiting for it: it imports and starts in its
    own process while this one brings up the broker and agents; ``start_prefect_api`` then waits for it."""
    from labtwin.orchestration.prefect_api import begin_ephemeral_api

    use_prefect_defaults()
    begin_ephemeral_api()


async def start_prefect_api() -> None:
    """Make sure Prefect's API answers before a flow starts.

    With no PREFECT_API_URL, labtwin starts Prefect's local API server itself (labtwin.orchestration.prefect_api,
    ADR 0019): on a leash, its database copied from a migrated template, waited for without blocking the event
    loop. Prefect's own start on its first client blocked the loop for 8.5 s, long enough to time out a Bus that
    was connecting. labtwin's Prefect defaults are set here, before the API starts (never at import).
    """
    from labtwin.orchestration.prefect_api import ensure_prefect_api

    use_prefect_defaults()
    await ensure_prefect_api()


def step_timeout_s(cmd: StepCommand, speed: float | None) -> float:
    """Wall seconds a step may take: its own time bound at the channel's speed (as-fast-as-possible
    channels are assumed no slower than real time), plus a grace for start-up and transport."""
    return cmd.time_budget_s() / (speed or 1.0) + TIMEOUT_GRACE_S


@task(name="step", task_run_name="{label}", cache_policy=NO_CACHE)
async def run_step(link: ChannelLink, command: StepCommand, label: str) -> StepEvent:
    """Publish one step and wait until the agent says it ended (with the reason and the step's stats).

    Callers pass the link as ``quote(link)``: Prefect otherwise walks every parameter for futures before
    each task run, and the link carries the run's growing list of step events (quadratic in steps)."""
    speed = link.status.speed if link.status else 1.0
    stall_s = max(STALL_MIN_S, 5 * command.sample_interval_s / (speed or 1e9))
    watcher = None
    if command.end.twin_soc is not None:
        watcher = asyncio.create_task(_watch_twin_soc(link, command))
        await asyncio.sleep(0)  # subscribed before the step starts
    seen_running = False

    def ended_here(d) -> bool:
        nonlocal seen_running
        if isinstance(d, RunStop) and d.run_id == command.run_id:
            return True  # the run ended while its flow waited for a step (stopped by hand, or by someone else)
        if isinstance(d, ChannelStatus) and d.run_id == command.run_id:
            on_step = d.step_index == command.step_index and d.state in (ChannelState.running, ChannelState.paused)
            if on_step:
                seen_running = True
            elif seen_running and d.state is not ChannelState.offline:
                link.resync_wanted = True  # the step is over but its end never reached this flow: ask again
                seen_running = False
        return (
            isinstance(d, StepEvent)
            and d.event == "ended"
            and d.run_id == command.run_id
            and d.step_index == command.step_index
        )

    try:
        link.reconnects_seen = link.bus.stats.reconnects  # this publish is the first ask
        link.resync_wanted = False
        await link.bus.publish(link.topic("cmd"), command)
        ended = await link.wait_for(
            ended_here,
            step_timeout_s(command, speed),
            stall_s,
            f"end of step {command.step_index} ({command.label})",
            ask=command,
        )
    finally:
        if watcher is not None:
            watcher.cancel()
    if isinstance(ended, RunStop):
        why = f"the agent ended the run ({ended.exit_status}: {ended.reason or 'no reason given'}) mid-step"
        log.warning("channel %s: step %d: %s", link.channel, command.step_index, why)
        return StepEvent(
            run_id=command.run_id,
            channel=link.channel,
            step_index=command.step_index,
            label=command.label,
            cycle=command.cycle,
            step=command.step,
            event="ended",
            time_s=ended.cell_time_s or 0.0,
            reason=EndReason(kind="aborted", name="run_stopped", message=why),
            stats=StepStats(),
        )  # the flow's own account, not the agent's: never added to the run's record
    link.events.append(ended)
    return ended


PREFECT_API_ATTEMPTS = 4


def _quoted(link: ChannelLink) -> ChannelLink:
    """The link as a task argument Prefect passes on as it is (see run_step): typed as the link it unwraps to."""
    return cast(ChannelLink, quote(link))


async def _run_step_tracked(link: ChannelLink, cmd: StepCommand) -> StepEvent:
    """run_step as a Prefect task run, surviving the Prefect API's own failures.

    With dozens of flows on the ephemeral server its SQLite locks and the API answers 503 even after the
    client's retries (bench/campaign.py: 31 of 64 jobs lost that way). The step is the lab's work and the
    task run only its record, so a failed task-run call is tried again; the agent never runs a step twice
    (a step index it has run is answered with how it ended), so trying again is safe."""
    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(PREFECT_API_ATTEMPTS):
        try:
            return await run_step(_quoted(link), cmd, label=f"{cmd.step_index:03d} c{cmd.cycle} {cmd.label}")
        except PrefectHTTPStatusError as exc:
            if attempt == PREFECT_API_ATTEMPTS - 1 or exc.response.status_code < 500:
                raise
            log.warning(
                "step %d: the Prefect API failed (%s); asking the agent again", cmd.step_index, exc.response.status_code
            )
            await asyncio.sleep(5.0 * (attempt + 1))
    raise AssertionError("unreachable")


async def _watch_twin_soc(link: ChannelLink, command: StepCommand) -> None:
    """End the step through the agent when the twin's state of charge reaches the target.

    The twin publishes its state of the cell (retained, every ~0.5 s of wall time and at each step event);
    the target is reached from whichever side the step's first state was on. In real time that is within a
    sample or two; at max speed the simulator runs ahead of the twin and the step ends later (in cell time)."""
    target = command.end.twin_soc
    if target is None:
        return
    sub = await link.bus.subscribe(busmod.cell_topic(link.lab, link.cell_id or "+", "state"))
    side = None
    try:
        async for message in sub:
            state = message.document
            if (
                not isinstance(state, CellState)
                or state.run_id != command.run_id
                or state.step != command.step_index
                or state.soc is None
            ):
                continue
            if side is None:
                side = state.soc < target
                continue
            if (state.soc < target) != side:
                reason = EndReason(
                    kind="end_condition",
                    name="twin_soc",
                    value=state.soc,
                    threshold=target,
                    message=f"the twin's state of charge reached {state.soc:.3f}",
                )
                await link.bus.publish(
                    link.topic("cmd"), EndStep(run_id=command.run_id, step_index=command.step_index, reason=reason)
                )
                return
    finally:
        sub.close()


async def _connect_channel(bus: Bus, lab: str, channel: str, own_run: str | None = None) -> ChannelLink:
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
        except TimeoutError:
            pass
    if link.status.state is ChannelState.running and link.status.run_id and link.status.run_id != own_run:
        raise ChannelBusy(f"channel {channel} is busy with run {link.status.run_id}")
    return link


RESUME_CHECKS_FROM: Final[int] = 1 << 30
"""Step indices from here up belong to resume checks, never to a protocol's steps.

A resumed run measures the cell's open-circuit voltage in a rest of its own before going on. That rest is
a step on the wire and in the store (the agent never runs a step index twice, the store keys step events
by it), so it needs an index of its own: the n-th check of a run is ``RESUME_CHECKS_FROM + n``. The
interpreter numbers a protocol's steps from 0 as it sends them; no protocol reaches 2**30 of them (and the
run refuses to, see ``check_protocol_step_index``), while the store's INTEGER columns hold up to 2**31 - 1."""


def is_resume_check(step_index: int) -> bool:
    """True for the step index of a resume check, False for a protocol's step."""
    return step_index >= RESUME_CHECKS_FROM


def next_resume_check_index(record: list[StepEvent]) -> int:
    """The index of a run's next resume check: after every check its record already holds (a run resumed
    twice at the same step measures again, instead of being answered with the first check's end)."""
    return max((e.step_index + 1 for e in record if is_resume_check(e.step_index)), default=RESUME_CHECKS_FROM)


def check_protocol_step_index(cmd: StepCommand) -> None:
    """A protocol's step must not take an index of the resume checks' range."""
    if is_resume_check(cmd.step_index):
        raise ValueError(f"step index {cmd.step_index} reaches the resume checks' range ({RESUME_CHECKS_FROM} up)")


async def _open_circuit_check(link: ChannelLink, before: StepCommand, check_index: int, why: str = "") -> str:
    """Before a resumed run goes on with ``before``: a rest of two sample intervals, its last voltage in the step's
    window (the protocol's within the channel's). A refusal reason, or "" when the cell is fit to go on."""
    interval = before.sample_interval_s
    check = StepCommand(
        run_id=before.run_id,
        step_index=check_index,
        cycle=before.cycle,
        repetition=before.repetition,
        step=StepKind.rest,
        label=f"resume check: open-circuit voltage before step {before.step_index}" + (f" ({why})" if why else ""),
        end=EndConditions(time_s=2 * interval),
        limits=before.limits.model_copy(update={"step_time_max_s": None}),
        sample_interval_s=interval,
    )
    measured = await run_step(_quoted(link), check, label=f"resume check before step {before.step_index:03d}")
    v = measured.stats.end_voltage_V if measured.stats else None
    low, high = before.limits.voltage_min_V, before.limits.voltage_max_V
    low, high = -math.inf if low is None else low, math.inf if high is None else high
    if measured.reason is None or measured.reason.kind != "end_condition" or v is None or not low <= v <= high:
        return (
            f"resume refused{' ' + why if why else ''}: the cell's open-circuit voltage "
            f"{v if v is None else f'{v:.4g} V'} is outside the protocol's window [{low:g}, {high:g}] V (or the "
            f"check failed: {measured.reason})"
        )
    return ""


MAX_AGENT_RESTARTS = 5
"""How often one run goes on after its agent restarted mid-step; an agent that keeps dying is not a blip."""


def _cut_by_agent_restart(ended: StepEvent) -> bool:
    return ended.reason is not None and ended.reason.kind == "error" and ended.reason.name == "agent_restart"


async def _go_on_after_agent_restart(link: ChannelLink, start: StartRun, cmd: StepCommand, cut: StepEvent) -> StepEvent:
    """The agent died mid-step and came back (its supervisor restarted it; it rebuilt the run from its spool and
    ended the step as error:agent_restart, with the outage on the record). Go on as a resumed run does: the run
    taken on again (the agent carries the cut step's charge), the cell's open-circuit voltage checked against the
    step's window, then the step again with what is left of its time. Returns the step's end, or the failure
    that stops the run."""
    log.warning(
        "channel %s: its agent restarted during step %d (%s); resuming the run",
        link.channel,
        cmd.step_index,
        cut.reason.message if cut.reason else "",
    )
    link.events.remove(cut)  # the step runs on: its cut end is replaced by its real one
    done = cut.stats or StepStats()
    resume_start = start.model_copy(
        update={
            "resume": ResumePoint(
                next_seq=0, time_s=max(cut.time_s, 0.0), step_index=cmd.step_index, step_stats=cut.stats
            )
        }
    )
    link.reconnects_seen = link.bus.stats.reconnects
    await link.bus.publish(link.topic("cmd"), resume_start)
    await link.wait_for(
        lambda d: isinstance(d, RunStart) and d.run_id == cmd.run_id,
        30,
        30,
        "run start (resuming after the agent's restart)",
        ask=resume_start,
    )
    interval = cmd.sample_interval_s
    refused = await _open_circuit_check(link, cmd, next_resume_check_index(link.events), "after an agent restart")
    if refused:
        return cut.model_copy(update={"reason": EndReason(kind="error", name="resume_refused", message=refused)})
    again = cmd
    if cmd.end.time_s is not None:
        left = max(cmd.end.time_s - done.duration_s, interval)
        again = cmd.model_copy(
            update={
                "end": cmd.end.model_copy(update={"time_s": left}),
                "label": f"{cmd.label} (resumed, {left:g} s left)",
            }
        )
    return await run_step(_quoted(link), again, label=f"{cmd.step_index:03d} c{cmd.cycle} {again.label}")


async def _resume(link: ChannelLink, interp: Interpreter, resume: ResumeState, agent_holds_run: bool) -> str:
    """Bring the interpreter to where the interrupted run stands; a refusal reason if the cell is not fit to go on.

    Completed steps are replayed (not run); a step the agent is still running is waited for, not repeated;
    then the cell's open-circuit voltage is measured and must lie in the step's window; the interrupted step
    gets what is left of its time."""
    completed = [e for e in resume.completed if not is_resume_check(e.step_index)]
    link.events.extend(completed)
    interp.replay(completed)
    status = link.known_status
    running = interp.next_command()
    if (
        agent_holds_run
        and running is not None
        and status.state is ChannelState.running
        and status.step_index == running.step_index
    ):
        # The agent is still running the step the dead flow had started: wait for it instead of repeating it.
        # Its end may fall between the look at the store and this link's subscription (events are not
        # retained): once the status says the step is over, ask for the step again; the agent never runs a
        # step index twice and answers with how it ended.
        speed = status.speed or 1.0

        def ended_or_over(d) -> bool:
            if isinstance(d, StepEvent):
                return d.event == "ended" and d.run_id == running.run_id and d.step_index == running.step_index
            return isinstance(d, ChannelStatus) and not (
                d.state is ChannelState.running and d.step_index == running.step_index
            )

        what = f"end of step {running.step_index} (running since before the resume)"
        ended = await link.wait_for(ended_or_over, step_timeout_s(running, speed), STALL_MIN_S, what)
        if not isinstance(ended, StepEvent):
            await link.bus.publish(link.topic("cmd"), running)
            ended = await link.wait_for(
                lambda d: (
                    isinstance(d, StepEvent)
                    and d.event == "ended"
                    and d.run_id == running.run_id
                    and d.step_index == running.step_index
                ),
                TIMEOUT_GRACE_S,
                STALL_MIN_S,
                what,
            )
        link.events.append(ended)
        if ended.reason is None or ended.reason.kind != "end_condition":
            return (
                f"step {running.step_index}: {ended.reason.kind}:{ended.reason.name}" if ended.reason else "step failed"
            )
        decision = interp.record(ended)
        if decision.action == "stop":
            return ""
    first = interp.next_command()
    if first is None:
        return ""
    refused = await _open_circuit_check(link, first, next_resume_check_index(resume.completed))
    if refused:
        return refused
    if resume.elapsed_in_step_s > 0 and first.end.time_s is not None and first.step_index == resume.interrupted_step:
        # The interrupted step keeps what is left of its time: a 1 h rest cut at 40 min rests 20 min more.
        left = max(first.end.time_s - resume.elapsed_in_step_s, first.sample_interval_s)
        interp.replace_next(
            first.model_copy(
                update={
                    "end": first.end.model_copy(update={"time_s": left}),
                    "label": f"{first.label} (resumed, {left:g} s left)",
                }
            )
        )
    return ""


@flow(name="run_protocol", flow_run_name="{channel}: {protocol}", log_prints=False)
async def run_protocol(
    protocol: str,
    channel: str,
    broker_url: str | BrokerConnection,
    lab: str = "default",
    run_id: str | None = None,
    cell_id: str | None = None,
    nominal_capacity_Ah: float | None = None,
    resume: ResumeState | None = None,
) -> RunSummary:
    """Run a protocol file on one channel's agent and return the run's summary.

    With ``resume`` (from labtwin.orchestration.resume.read_run on the store) the run goes on where it was interrupted:
    completed steps are not run again, the cell's open-circuit voltage is measured and checked against
    the protocol's window first, and the interrupted step gets what is left of its time budget."""
    wall_start = time.monotonic()
    path = resolve_protocol_path(protocol)
    proto = load_protocol(path)
    run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S')}-{channel}-{uuid.uuid4().hex[:6]}"
    try:
        flow_run = getattr(get_run_context(), "flow_run", None)
        flow_run_id = str(flow_run.id) if flow_run is not None else None
    except Exception:  # pragma: no cover - outside a flow run
        flow_run_id = None
    async with Bus(
        as_identity(broker_url, "orchestrator"), f"flow-{run_id}-{uuid.uuid4().hex[:6]}"
    ) as bus:  # a resumed run is a new client
        link = await _connect_channel(bus, lab, channel, own_run=run_id if resume else None)
        status = link.known_status
        program = compile_program(
            proto,
            CompileContext(run_id, nominal_capacity_Ah or status.nominal_capacity_Ah, status.limits),
        )
        interp = Interpreter(program)
        cell = cell_id or status.cell_id or ""
        link.cell_id = cell
        agent_holds_run = status.run_id == run_id
        start = StartRun(
            run_id=run_id,
            channel=channel,
            cell_id=cell,
            protocol=proto.metadata.name,
            n_steps=len(program.steps),
            flow_run_id=flow_run_id,
            resume=resume.point if resume else None,
            anomaly_policy=proto.anomalies,
        )
        if not agent_holds_run:
            link.reconnects_seen = bus.stats.reconnects
            await bus.publish(link.topic("cmd"), start)
            refusal = f"refused run {run_id}:"
            started = await link.wait_for(
                lambda d: (
                    (isinstance(d, RunStart) and d.run_id == run_id)
                    or (isinstance(d, ChannelStatus) and d.message.startswith(refusal))
                    # its RunStart lost across a reconnect: the agent's status says it holds the run
                    or (isinstance(d, ChannelStatus) and d.run_id == run_id and d.state is not ChannelState.offline)
                ),
                30,
                30,
                "run start",
                ask=start,
            )
            if isinstance(started, ChannelStatus) and started.message.startswith(refusal):
                if "already ended" in started.message:  # a run id is used once: waiting would not help
                    raise ChannelUnavailable(f"channel {channel}: {started.message}")
                raise ChannelBusy(f"channel {channel}: {started.message}")  # another flow's run got it first
        exit_status, reason = "success", ""
        try:
            if resume is not None:
                refused = await _resume(link, interp, resume, agent_holds_run)
                if refused:
                    exit_status, reason = "failed", refused
                    interp.stop_reason = refused
            agent_restarts = 0
            while (cmd := interp.next_command()) is not None:
                check_protocol_step_index(cmd)
                ended = await _run_step_tracked(link, cmd)
                while _cut_by_agent_restart(ended) and agent_restarts < MAX_AGENT_RESTARTS:
                    agent_restarts += 1
                    ended = await _go_on_after_agent_restart(link, start, cmd, ended)
                if ended.reason is None or ended.reason.kind != "end_condition":
                    exit_status = (
                        "failed" if ended.reason and ended.reason.kind in {"safety_limit", "error"} else "aborted"
                    )
                    r = ended.reason
                    reason = (
                        f"step {cmd.step_index}: {r.kind}:{r.name}" + (f" ({r.message})" if r.message else "")
                        if r
                        else ""
                    )
                    break
                decision = interp.record(ended)
                if decision.action == "pause":
                    # The agent holds the next step at open circuit until `labtwin resume`; the flow's step
                    # timeouts do not run while the channel says paused.
                    await bus.publish(link.topic("cmd"), PauseRun(run_id=run_id, reason=decision.reason))
            if exit_status == "success" and interp.stop_reason:
                reason = interp.stop_reason
        except BaseException as exc:
            exit_status, reason = "aborted", f"{type(exc).__name__}: {exc}"
            await bus.publish(link.topic("cmd"), StopRun(run_id=run_id, exit_status="aborted", reason=reason))
            await bus.flush(5)
            raise
        stop_cmd = StopRun(run_id=run_id, exit_status=exit_status, reason=reason)
        link.reconnects_seen = bus.stats.reconnects
        await bus.publish(link.topic("cmd"), stop_cmd)
        stop = await link.wait_for(
            lambda d: isinstance(d, RunStop) and d.run_id == run_id, 30, 30, "run stop", ask=stop_cmd
        )
    # The agent's RunStop says how the run ended on the channel; a run its flow could not finish (a step that
    # did not end on its end condition) has not succeeded, whatever a StopRun from elsewhere claimed.
    if exit_status != "success" and stop.exit_status == "success":
        final_status, final_reason = exit_status, f"{reason}; the agent's record says: success ({stop.reason})"
    else:
        final_status, final_reason = stop.exit_status, stop.reason or reason
    return summarize_run(
        run_id,
        channel,
        link.events,
        cell_id=cell,
        protocol=proto.metadata.name,
        exit_status=final_status,
        reason=final_reason,
        wall_time_s=time.monotonic() - wall_start,
    )
