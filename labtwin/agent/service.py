"""The channel agent's service: MQTT in and out, command dispatch, run documents and status.

One agent per channel, on the PC next to the instrument. Its jobs live in their own modules:
lease.py (which run holds the channel), techniques.py (the readings of a step), sample_loop.py
(the safety loop every reading goes through), batching.py (SampleBatch documents), control.py
(what the event loop and the step thread share), safety.py (the limit and end-condition checks).

The step loop runs in the agent's own thread (drivers block on I/O; the event loop must keep
receiving commands such as an abort while a step runs). Not asyncio's shared default pool: a step
holds its thread for the whole step, and aiomqtt connects through that pool, so N channels in one
process could starve every reconnect. Every sample is checked against the channel's limits tightened
by the command's own, in this process: the network is never inside the safety loop. Whatever happens
(a limit, an abort, an exception, a cancelled task) the instrument is put in its safe state.

Documents out: RunStart on a StartRun command, StepEvent started/ended per step, SampleBatch as the
batcher flushes them, RunStop on StopRun. Sequence numbers run per run without gaps.

Every batch and event is written to the channel's spool (spool.py) before the bus sees it, and a task on
the event loop hands the spool to the bus in order: the step thread never waits on the network, so with
the broker away for hours the cell is still read and checked at its interval. The recorder asks for what
it misses with a ResendRequest, answered from the spool (issue 14).

On start, before the broker or anything else, the instrument is put in its safe state (output off): an agent
that died mid-step left it sourcing (issue 14: 1.2 mA on a 2450 until someone restarted the agent by hand). Then
a run the previous agent died in is rebuilt from the spool (recovery.py): its counters go on where they were,
the step it was cut in is ended as ``error:agent_restart``, and an ``Outage`` document puts the stretch nobody
read the instrument on the record. ``labtwin agent --supervise`` (labtwin/cli/supervise.py) restarts a dead agent.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from labtwin import bus as busmod
from labtwin.agent.admission import admit
from labtwin.agent.batching import PACED_BATCH_SIZE, Pacer
from labtwin.agent.control import StepControl
from labtwin.agent.lease import DEFAULT_GRACE_S, Lease, RunContext
from labtwin.agent.recovery import RecoveredRun, rebuild_runs
from labtwin.agent.sample_loop import StepLoop
from labtwin.agent.spool import Spool
from labtwin.agent.techniques import Techniques
from labtwin.bus import Bus, Refusal
from labtwin.bus.sessions import claim_session
from labtwin.devices.clock import Clock
from labtwin.devices.potentiostat import Potentiostat
from labtwin.documents import (
    ChannelState,
    ChannelStatus,
    EndReason,
    EndStep,
    Limits,
    Outage,
    PauseRun,
    ResendRequest,
    ResumeRun,
    RunStart,
    RunStop,
    SampleBatch,
    SecurityEvent,
    StartRun,
    StepCommand,
    StepEvent,
    StepStats,
    StopRun,
)
from labtwin.documents.codec import MalformedPayload, decode, encode
from labtwin.security import BrokerConnection, as_identity
from labtwin.security.profile import agent_identity

log = logging.getLogger(__name__)

__all__ = ["Agent", "RunContext"]

MAX_RESEND_BATCHES = 2_000
"""Batches one ResendRequest is answered with at most: a recorder far behind is served in rounds, not at once."""
ANNOUNCE_EVERY_S = 60.0
"""How often a spooled, finished run no recorder has confirmed whole is announced again (its RunStop)."""
ENDED_RUNS_KEPT = 1000
"""How many ended runs an agent remembers (run id and RunStop, a few hundred bytes each): a late StartRun or step
of one is refused, a repeated StopRun answered."""


class Agent:
    """Serves one channel: commands in on .../cmd, documents out on .../event, .../data, .../status."""

    def __init__(
        self,
        *,
        lab: str,
        channel: str,
        driver: Potentiostat,
        clock: Clock,
        broker_url: str | BrokerConnection,
        channel_limits: Limits,
        cell_id: str,
        nominal_capacity_Ah: float | None = None,
        driver_name: str = "",
        batch_size: int = 100,
        pace: Pacer | None = None,
        batch_max_wall_s: float = 0.1,
        status_every_wall_s: float = 1.0,
        lease_grace_s: float = DEFAULT_GRACE_S,
        spool_dir: Path | None = None,
        outbox_size: int = 10_000,
        spool: Spool | None = None,
    ) -> None:
        self.lab = busmod.check_name("lab", lab)
        self.channel = busmod.check_name("channel", channel)
        self.driver = driver
        self.clock = clock
        self.broker_url = broker_url
        self.channel_limits = channel_limits
        self.cell_id = cell_id
        self.nominal_capacity_Ah = nominal_capacity_Ah
        self.driver_name = driver_name
        self.batch_size = batch_size
        # A dry-run's simulated channel at max speed: waits for the twin that follows it (labtwin.twin.pacing),
        # in runs whose anomaly policy acts (stop or pause); None everywhere else.
        self.pace = pace
        self._paced_runs: set[str] = set()
        self._paced_previous_end_s: dict[str, float] = {}
        self.batch_max_wall_s = batch_max_wall_s
        self.status_every_wall_s = status_every_wall_s
        self.lease_grace_s = lease_grace_s
        self.run: RunContext | None = None
        self.control = StepControl()
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"step-{channel}")
        self._bus: Bus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._queue: asyncio.Queue[BaseModel] = asyncio.Queue()
        self._last_status_wall = 0.0
        self._state = ChannelState.idle
        self._background: set[asyncio.Task[None]] = set()
        self._last_reassert_s = -1.0
        self._stopping = False
        self.spool_dir = spool_dir
        self.outbox_size = outbox_size  # the bus's memory; past it the spool (disk) holds what waits
        self.spool: Spool | None = spool  # given: opened (and locked) by the caller before the driver was built
        self._start_message = ""
        self.safe_at_wall: float | None = None  # when serve put the instrument in its safe state (time.time())
        self._spooled_bus: _SpooledBus | None = None
        self._spool_wake = asyncio.Event()
        self._drain_lock = asyncio.Lock()
        self._status_pending: Any = None  # the step thread's last status publish, until the event loop takes it
        # How the last runs ended, by run id: a StopRun is answered from it, a StartRun or step of one is refused.
        self._ended_runs: OrderedDict[str, RunStop] = OrderedDict()
        self._announce_wake = asyncio.Event()
        self._resending = False  # an answer to a ResendRequest is being published

    # ------------------------------------------------------------------ topics

    def _t(self, kind: str) -> str:
        return busmod.topic(self.lab, self.channel, kind)

    @property
    def bus(self) -> Bus:
        """The bus as the agent's code publishes on it: batches and events through the spool (_SpooledBus)."""
        if self._bus is None or self._spooled_bus is None:
            raise RuntimeError(f"channel {self.channel}: the agent is not serving (no bus)")
        return self._spooled_bus  # type: ignore[return-value]  # the publish and attributes of a Bus

    # ------------------------------------------------------------------ service

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever), reconnecting to the broker as needed."""
        self._loop = asyncio.get_running_loop()
        will = (self._t("status"), busmod.offline_status(self.channel))
        connection = as_identity(self.broker_url, agent_identity(self.channel))
        self.spool = spool = self.spool or Spool.for_channel(self.lab, self.channel, self.spool_dir)
        # The commands seen within the clock-skew window, on disk beside the spool (the agent's state is in one
        # place, the lab file's spool_dir): a restart must not let a captured one replay.
        replay_state = spool.path.parent.parent / "security" / f"{self.lab}-{self.channel}-commands.json"
        try:
            # First, before the broker and before any document: whatever the last agent left on (it may have been
            # killed mid-step), the output goes off. The spool is opened (and locked) before this on purpose: a
            # second agent of this channel is refused there without touching the first one's instrument.
            self._safe_state()
            self.safe_at_wall = time.time()
            self._recover()
            # Its broker session under a client id nobody can guess (labtwin/bus/sessions.py), kept beside the
            # spool: the spool's lock already makes this agent the only one of its channel there.
            session = claim_session(f"agent-{self.lab}-{self.channel}", spool.path.parent.parent / "sessions")
            try:
                await self._serve_on_bus(connection, will, replay_state, stop, session.client_id)
            finally:
                session.release()
        finally:
            spool.close()

    async def _serve_on_bus(
        self,
        connection: BrokerConnection,
        will: tuple[str, bytes],
        replay_state: Path,
        stop: asyncio.Event | None,
        client_id: str,
    ) -> None:
        async with Bus(
            connection,
            client_id,
            will=will,
            persistent=True,
            replay_state=replay_state,
            outbox_size=self.outbox_size,
        ) as bus:
            self._bus = bus
            self._spooled_bus = _SpooledBus(self, bus)
            bus.on_refusal = self._refused
            # After a broker restart its retained status may be gone or be this agent's last will: say it again.
            bus.on_reconnect = self._on_reconnect
            commands = await bus.subscribe(self._t("cmd"))
            await self._publish_status(force=True, message=self._start_message)
            self._ready.set()
            executor = asyncio.create_task(self._execute_commands())
            receiver = asyncio.create_task(self._receive(commands))
            pump = asyncio.create_task(self._pump_spool())
            self._spool_wake.set()  # what an earlier run of this agent journalled and never handed over
            self._announce_wake.set()  # and the finished runs it holds that no recorder confirmed whole
            announcer = asyncio.create_task(self._announce_unconfirmed())
            waiters: list[asyncio.Task[Any]] = [executor, receiver, pump, announcer]
            # Its own retained status read back: after a broker restart (or a network drop) the broker holds
            # this agent's last will, "offline", and a forged one would hide the agent from every new subscriber.
            waiters.append(asyncio.create_task(self._guard_status(await bus.subscribe(self._t("status")))))
            if stop is not None:
                waiters.append(asyncio.create_task(stop.wait()))
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        raise exc
            finally:
                self._stopping = True
                self.control.abort.set()
                for task in waiters:
                    task.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
                self._safe_state()
                self._step_thread.shutdown(wait=False)
                if bus.connected:  # what the spool holds goes out now; otherwise at the next start
                    try:
                        await asyncio.wait_for(self._drain_spool(), 5.0)
                    except TimeoutError:
                        log.warning("channel %s: stopped with documents in the spool; sent at next start", self.channel)
                await bus.publish(self._t("status"), self._status(ChannelState.offline, "agent stopped"), retain=True)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def _receive(self, commands: busmod.Subscription) -> None:
        """Commands as they arrive. An abort, an EndStep, a pause and a resume act at once, within one sample
        of the running step; the others wait their turn in the queue behind it."""
        async for message in commands:
            doc = message.document
            run = self.run
            log.info(
                "channel %s: %s for run %s from %s",
                self.channel,
                getattr(doc, "kind", type(doc).__name__),
                getattr(doc, "run_id", "-"),
                message.sender or "an unsigned sender",
            )
            if isinstance(doc, StopRun) and doc.exit_status != "success" and run and doc.run_id == run.run_id:
                self.control.abort.set()  # takes effect within one sample of the running step
            if isinstance(doc, ResendRequest):
                if doc.channel == self.channel:  # answered beside the running step, never queued behind it
                    self._background_task(self._resend(doc))
                continue
            if isinstance(doc, EndStep):
                if run is None or doc.run_id == run.run_id:  # none yet: its StartRun may still be queued
                    self.control.request_end(doc.run_id, doc.step_index, doc.reason)
                continue
            if isinstance(doc, (PauseRun, ResumeRun)):
                if run is not None and doc.run_id == run.run_id:
                    if isinstance(doc, PauseRun):
                        self.control.pause.set()
                        log.warning("channel %s: run %s paused: %s", self.channel, doc.run_id, doc.reason)
                        await self._publish_status(
                            force=True, state=ChannelState.paused, message=f"paused: {doc.reason}"
                        )
                    else:
                        self.control.pause.clear()
                        await self._publish_status(force=True, state=ChannelState.running, message="resumed")
                continue
            await self._queue.put(doc)

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ the spool

    def _journal(self, topic: str, payload: bytes, run_id: str | None, seq: int | None = None) -> None:
        """Into the spool, then wake the pump. Any thread: the step thread journals its batches here."""
        assert self.spool is not None and self._loop is not None
        self.spool.append(topic, payload, run_id, seq)
        self._loop.call_soon_threadsafe(self._spool_wake.set)

    async def _pump_spool(self) -> None:
        """Hands the spool to the bus in the order it was written; blocks (here, not in the step) on a full outbox."""
        while True:
            await self._spool_wake.wait()
            self._spool_wake.clear()
            await self._drain_spool()

    async def _drain_spool(self) -> None:
        assert self.spool is not None and self._bus is not None
        async with self._drain_lock:
            while True:
                entries = self.spool.unhanded()
                if not entries:
                    return
                handed: list[int] = []
                try:
                    for entry in entries:
                        await self._bus.publish(entry.topic, entry.payload)
                        handed.append(entry.ident)
                finally:
                    self.spool.mark_handed(handed)

    async def _resend(self, req: ResendRequest) -> None:
        """A recorder's ResendRequest, from the spool: the batches it names (and the run's events), or, when it
        holds the whole run, the run's entries dropped."""
        assert self.spool is not None and self._bus is not None
        spool = self.spool
        if req.complete:
            if self.run is None or self.run.run_id != req.run_id:
                gone = await asyncio.to_thread(spool.forget_run, req.run_id)
                log.info("channel %s: run %s is stored whole; %d spool entries dropped", self.channel, req.run_id, gone)
            return
        if self._resending:
            # The last answer is still on its way (in the outbox): asking again now would queue the same batches
            # twice and feed the backlog that made them go missing. The recorder asks again for what stays missing.
            log.debug("channel %s: a resend is in progress; request for run %s skipped", self.channel, req.run_id)
            return
        self._resending = True
        try:
            await self._resend_from_spool(spool, req)
        finally:
            self._resending = False

    async def _resend_from_spool(self, spool: Spool, req: ResendRequest) -> None:
        assert self._bus is not None

        def read() -> list[Any]:
            # In a thread: over a week-long run's spool (a million rows) these reads took seconds, and on the event
            # loop they stalled every keepalive of the process (bench/soak.py: all 33 clients timed out at once).
            found: list[Any] = []
            for first, last in req.ranges:  # at most MAX_RESEND_BATCHES: the rest at the recorder's next request
                found += spool.batches(req.run_id, first, last, limit=MAX_RESEND_BATCHES - len(found))
                if len(found) >= MAX_RESEND_BATCHES:
                    break
            if req.events:
                found += spool.events(req.run_id)
            return found

        entries = await asyncio.to_thread(read)
        log.info(
            "channel %s: resending %d documents of run %s the recorder misses", self.channel, len(entries), req.run_id
        )
        for entry in entries:
            await self._bus.publish(entry.topic, entry.payload)

    # ------------------------------------------------------------------ a run the last agent died in

    def _journal_event(self, doc: Outage | StepEvent | RunStop) -> None:
        self._journal(self._t("event"), encode(doc), doc.run_id)

    def _recover(self) -> None:
        """Rebuild the run(s) a killed agent left in the spool: put each outage on the record, end each cut step
        as ``error:agent_restart``. The latest is the agent's run again, waiting for its flow: a re-sent step is
        answered from it, a StartRun of it (with a resume point: the flow resumes it) takes it on, and a new run
        supersedes it only once the lease's grace (counted from the dead agent's last record) is over. Older ones
        (a later run followed them) are closed as aborted."""
        assert self.spool is not None and self.safe_at_wall is not None
        found = rebuild_runs(self.spool)
        for k, recovered in enumerate(found):
            run = self._resume_recovered(recovered)
            if k == len(found) - 1:
                run.restarted = True
                self.run = run
                self.control.begin_run(run.run_id)
                self._state = ChannelState.fault if run.tripped else ChannelState.idle
                cut = f", step {recovered.cut.step_index} cut (error:agent_restart)" if recovered.cut else ""
                self._start_message = (
                    f"agent restarted: run {run.run_id} resumed from the spool{cut}; waits for its flow"
                )
                log.warning("channel %s: %s", self.channel, self._start_message)
                continue
            why = "a later run followed"
            self._journal_event(
                stop := RunStop(
                    run_id=run.run_id,
                    channel=self.channel,
                    exit_status="aborted",
                    reason=f"abandoned: the agent stopped mid-run and restarted; {why}",
                    n_samples=run.n_samples,
                    n_batches=run.n_batches,
                    last_seq=run.next_seq - 1,
                    cell_time_s=run.last_time_s,
                )
            )
            self._remember_ended(stop)
            log.warning(
                "channel %s: run %s left by the last agent closed as aborted (%s)", self.channel, run.run_id, why
            )

    def _resume_recovered(self, recovered: RecoveredRun) -> RunContext:
        """The run's context going on after the outage, with the outage (and the cut step's end) journalled."""
        assert self.safe_at_wall is not None
        run = recovered.run
        wall_span_s = max(0.0, self.safe_at_wall - recovered.last_wall_s)
        # A clock does not outlive its process: cell time across the restart is the wall gap at the channel's
        # speed (an as-fast-as-possible virtual clock has no such relation: none of its time is known to pass).
        span_s = wall_span_s * self.clock.speed if self.clock.speed else 0.0
        from_s, to_s = recovered.last_sample_time_s, recovered.last_sample_time_s + span_s
        run.last_time_s = to_s
        run.start_cell_s = self.clock.now() - to_s  # the next reading's run time goes on from the outage's end
        run.last_command_wall = time.monotonic() - wall_span_s  # its flow had no agent to speak to since then
        cut = recovered.cut
        outage = Outage(
            run_id=run.run_id,
            channel=self.channel,
            step_index=cut.step_index if cut is not None else None,
            from_time_s=from_s,
            to_time_s=to_s,
            span_s=span_s,
            wall_from=datetime.fromtimestamp(recovered.last_wall_s, UTC),
            wall_to=datetime.fromtimestamp(self.safe_at_wall, UTC),
            wall_span_s=wall_span_s,
            charge_Ah=None,  # no labtwin driver integrates charge on its own (a 2450 cannot): unknown, not zero
            charge_known=False,
            message=(
                f"agent restart: no reading from {from_s:.1f} s to {to_s:.1f} s of run time ({span_s:.1f} s of cell "
                f"time, {wall_span_s:.1f} s wall); charge passed meanwhile unknown ({self.driver_name or 'driver'} "
                "cannot report it); output off at restart"
            ),
        )
        self._journal_event(outage)
        log.warning("channel %s: run %s: %s", self.channel, run.run_id, outage.message)
        if cut is not None:
            reason = EndReason(kind="error", name="agent_restart", message=outage.message)
            ended = cut.model_copy(
                update={
                    "event": "ended",
                    "time_s": to_s,
                    "reason": reason,
                    "stats": recovered.cut_stats,
                    "wall_time": datetime.now(UTC),
                }
            )
            run.ended[cut.step_index] = ended
            self._journal_event(ended)
        return run

    def _remember_ended(self, stop: RunStop) -> None:
        self._ended_runs[stop.run_id] = stop
        self._ended_runs.move_to_end(stop.run_id)
        while len(self._ended_runs) > ENDED_RUNS_KEPT:
            self._ended_runs.popitem(last=False)

    def _on_reconnect(self) -> None:
        """After a broker restart its retained status may be gone or be this agent's last will: say it again; and
        a recorder that restarted meanwhile may not know of the runs this spool still holds: announce them."""
        self._background_task(self._publish_status(force=True))
        self._announce_wake.set()

    async def _announce_unconfirmed(self) -> None:
        """Every ANNOUNCE_EVERY_S (and after a reconnect), publish again the RunStop of every finished run the spool
        still holds: no recorder has confirmed it whole. A recorder that received a run's documents but crashed
        before committing them never heard of it after its restart and cannot ask; this RunStop tells it what
        to ask for (ADR 0013). The spool, not the broker's acknowledgement, is the durable copy."""
        assert self.spool is not None and self._bus is not None
        while True:
            try:
                await asyncio.wait_for(self._announce_wake.wait(), ANNOUNCE_EVERY_S)
            except TimeoutError:
                pass
            self._announce_wake.clear()
            current = self.run.run_id if self.run is not None else None
            # In a thread: the spool may hold a week of samples.
            found = await asyncio.to_thread(_finished_runs, self.spool, current)
            for run_id, entry in found:
                if run_id not in self._ended_runs and isinstance(stop := _decoded(entry.topic, entry.payload), RunStop):
                    self._remember_ended(stop)  # ended before this agent started: the spool still holds it
                log.info("channel %s: run %s is not yet confirmed stored; announcing it", self.channel, run_id)
                await self._bus.publish(entry.topic, entry.payload)

    async def _guard_status(self, own: busmod.Subscription) -> None:
        """Reads back the channel's status: a forged one is answered in ``_refused``; an "offline" one while
        this agent is alive (its own will or status replayed) is answered here, by re-asserting."""
        async for message in own:
            doc = message.document
            if isinstance(doc, ChannelStatus) and doc.state is ChannelState.offline and not self._stopping:
                self._reassert_status()

    def _reassert_status(self) -> None:
        """Publish the true status again, at most once a second however many forgeries arrive."""
        now = time.monotonic()
        if now - self._last_reassert_s < 1.0:
            return
        self._last_reassert_s = now
        log.warning(
            "channel %s: the broker holds a status for it that is not this agent's live one (its last will after a "
            "dropped connection, or a forgery); publishing the true one",
            self.channel,
        )
        self._background_task(self._publish_status(force=True, state=self._state))

    def _refused(self, refusal: Refusal) -> None:
        """A command the bus would not deliver: said on the channel's event topic; the step goes on.

        A status on this channel's topic that is not this agent's (a forged retained "offline") is
        overwritten at once with the true one, so the next `labtwin run` finds the agent."""
        if refusal.topic == self._t("status"):
            self._reassert_status()
            return
        if not refusal.topic.endswith("/cmd"):
            return
        log.warning(
            "channel %s: refused a command from %s: %s",
            self.channel,
            refusal.sender or "an unsigned sender",
            refusal.reason,
        )
        event = SecurityEvent(
            lab=self.lab, channel=self.channel, topic=refusal.topic, sender=refusal.sender, reason=refusal.reason
        )
        # Called on the event loop (the bus's receive loop): queue the publish, never wait for it here.
        task = asyncio.get_running_loop().create_task(self.bus.publish(self._t("event"), event))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _execute_commands(self) -> None:
        while True:
            doc = await self._queue.get()
            try:
                if isinstance(doc, StartRun):
                    await self._start_run(doc)
                elif isinstance(doc, StepCommand):
                    await self._run_step(doc)
                elif isinstance(doc, StopRun):
                    await self._stop_run(doc)
            except Exception as exc:  # one bad command must not take the channel down
                log.exception("channel %s: command %s failed", self.channel, type(doc).__name__)
                self._safe_state()
                await self._publish_status(force=True, state=ChannelState.fault, message=str(exc))

    # ------------------------------------------------------------------ run documents

    async def _start_run(self, cmd: StartRun) -> None:
        if self.run is not None and self.run.run_id == cmd.run_id:
            # The flow of a run rebuilt after an agent restart starts it again, or (having learnt of the restart
            # from the cut step's end) resumes it: either way the run is taken on, its cut steps made runnable.
            if self.run.restarted or (cmd.resume is not None and _cut_steps(self.run)):
                await self._take_on_restarted(self.run, cmd)
            return  # a repeated StartRun (QoS 1 duplicate): already started
        ended = self._ended_runs.get(cmd.run_id)
        if ended is not None and cmd.resume is None:
            # A run id names one run: a StartRun of one that ended is a late duplicate or a confused flow, and
            # starting it would write a second record under the first's id. Resuming it (`labtwin run --resume`,
            # a resume point read from the store) is the flow's decision and goes on below.
            message = (
                f"refused run {cmd.run_id}: it already ended ({ended.exit_status}: {ended.reason or 'no reason'}); "
                "a run id is used once: resume it with `labtwin run --resume` or start a new run"
            )
            log.warning("channel %s: %s", self.channel, message)
            await self.bus.publish(self._t("event"), ended)
            await self._publish_status(force=True, state=self._state, message=message)
            return
        if self.run is not None:
            if Lease(self.lease_grace_s).holds(self.run):
                log.warning("channel %s: refused run %s: busy with run %s", self.channel, cmd.run_id, self.run.run_id)
                await self._publish_status(
                    force=True, state=self._state, message=f"refused run {cmd.run_id}: busy with run {self.run.run_id}"
                )
                return
            await self._finish_run(
                self.run,
                "aborted",
                f"abandoned: no command from its flow for {self.run.quiet_s():.0f} s; superseded by run {cmd.run_id}",
            )
        self.control.abort.clear()
        self.control.pause.clear()
        self.control.begin_run(cmd.run_id)
        self.run = RunContext.start(cmd, now_cell_s=self.clock.now())
        doc = RunStart(
            run_id=cmd.run_id,
            lab=self.lab,
            channel=self.channel,
            cell_id=cmd.cell_id or self.cell_id,
            protocol=cmd.protocol,
            n_steps=cmd.n_steps,
            flow_run_id=cmd.flow_run_id,
            first_seq=self.run.next_seq,
            metadata=cmd.metadata,
            anomaly_policy=cmd.anomaly_policy,
        )
        if self.pace is not None and any(action in ("stop", "pause") for action in cmd.anomaly_policy.values()):
            self._paced_runs.add(cmd.run_id)
        await self.bus.publish(self._t("event"), doc)
        await self._publish_status(force=True, state=ChannelState.running)

    async def _take_on_restarted(self, run: RunContext, cmd: StartRun) -> None:
        """The flow of a run rebuilt after an agent restart starts it again. With a resume point it resumes it
        (read from the store): that is the flow's decision, so the steps the restart cut run again with what is
        left of them (their charge so far carried), and the sequence numbers go on from the higher of the
        spool's and the store's. Without one it is a StartRun repeated across the restart. Either way the run
        is the flow's again, and its RunStart is published for the flow that waits for it."""
        run.restarted = False
        run.heard_from_flow()
        if cmd.resume is not None:
            r = cmd.resume
            cut = _cut_steps(run)
            for index in cut:
                del run.ended[index]
            run.next_seq = max(run.next_seq, r.next_seq)
            if r.step_index is not None and r.step_stats is not None:
                run.carried[r.step_index] = r.step_stats
            log.warning("channel %s: run %s resumed by its flow; steps %s run again", self.channel, run.run_id, cut)
        doc = RunStart(
            run_id=run.run_id,
            lab=self.lab,
            channel=self.channel,
            cell_id=cmd.cell_id or run.cell_id or self.cell_id,
            protocol=cmd.protocol,
            n_steps=cmd.n_steps,
            flow_run_id=cmd.flow_run_id,
            first_seq=run.next_seq,
            metadata=cmd.metadata,
            anomaly_policy=cmd.anomaly_policy,
        )
        await self.bus.publish(self._t("event"), doc)
        await self._publish_status(force=True, state=ChannelState.fault if run.tripped else ChannelState.running)

    async def _stop_run(self, cmd: StopRun) -> None:
        run = self.run
        if run is None or run.run_id != cmd.run_id:
            last = self._ended_runs.get(cmd.run_id)
            if last is not None:
                # A flow that lost the RunStop across a reconnect asks again: say again how the run ended.
                await self.bus.publish(self._t("event"), last)
            return
        status = cmd.exit_status
        if run.tripped is not None and status == "success":
            status = "failed"
        await self._finish_run(run, status, cmd.reason or (run.tripped.name if run.tripped else ""))

    async def _finish_run(self, run: RunContext, status: str, reason: str) -> None:
        self.control.pause.clear()
        self._safe_state()
        stop = RunStop(
            run_id=run.run_id,
            channel=self.channel,
            exit_status=status,
            reason=reason,
            n_samples=run.n_samples,
            n_batches=run.n_batches,
            last_seq=run.next_seq - 1,
            cell_time_s=run.last_time_s,
        )
        self._remember_ended(stop)
        await self.bus.publish(self._t("event"), stop)
        self.run = None
        await self._publish_status(force=True, state=ChannelState.idle)

    # ------------------------------------------------------------------ steps

    def _step_event(
        self,
        cmd: StepCommand,
        event: Literal["started", "ended"],
        time_s: float,
        reason: EndReason | None = None,
        stats: StepStats | None = None,
    ) -> StepEvent:
        return StepEvent(
            run_id=cmd.run_id,
            channel=self.channel,
            step_index=cmd.step_index,
            label=cmd.label,
            cycle=cmd.cycle,
            step=cmd.step,
            event=event,
            time_s=time_s,
            reason=reason,
            stats=stats,
        )

    async def _run_step(self, cmd: StepCommand) -> None:
        """One step: refused, repeated (already ran), held while paused, or run in the step thread."""
        run = self.run
        if run is None or run.run_id != cmd.run_id:
            # A step of a run this agent does not hold is never run: starting the run on the step's word would
            # run it again from seq 0 and cell time 0 under a finished run's id (a run stopped from outside its
            # flow, then asked for its next step, wrote 582 conflicting batches that way), or start current on
            # a forged command. A run starts with its StartRun (after an agent restart, from the spool).
            ended = self._ended_runs.get(cmd.run_id)
            if ended is not None:
                why = f"run {cmd.run_id} already ended ({ended.exit_status}: {ended.reason or 'no reason given'})"
                name = "run_ended"
            else:
                holds = f"it holds run {run.run_id}" if run is not None else "it holds no run"
                why = f"no StartRun of run {cmd.run_id} reached this agent ({holds})"
                name = "unknown_run"
            log.warning("channel %s: step %d not run: %s", self.channel, cmd.step_index, why)
            not_run = EndReason(kind="error", name=name, message=why)
            await self.bus.publish(self._t("event"), self._step_event(cmd, "ended", 0.0, not_run, StepStats()))
            if ended is not None:
                await self.bus.publish(self._t("event"), ended)  # its flow learns how the run ended
            return
        run.heard_from_flow()
        run.restarted = False  # its flow speaks to this agent again
        if cmd.step_index in run.ended:
            # A step this run already ran: a QoS 1 redelivery, or a flow that sent it again after losing track
            # (a Prefect API error around the task run). Say again how it ended; never run a step twice.
            log.info(
                "channel %s: step %d of run %s already ran; repeating its end", self.channel, cmd.step_index, run.run_id
            )
            await self.bus.publish(self._t("event"), run.ended[cmd.step_index])
            return
        limits = self.channel_limits.tighten(cmd.limits)
        started = self._step_event(cmd, "started", run.last_time_s)
        if run.tripped is not None:
            why = run.tripped.message if run.tripped.name == "refused" else f"by safety limit {run.tripped.name}"
            reason = EndReason(kind="error", name="run_tripped", message=f"run stopped {why}")
            await self.bus.publish(self._t("event"), started)
            await self._publish_step_end(cmd, run, reason, StepStats())
            return
        if self.control.abort.is_set():
            reason = EndReason(kind="aborted", name="abort", message="run was aborted")
            await self._publish_step_end(cmd, run, reason, StepStats())
            return
        refused = admit(cmd, limits)
        if refused is not None:  # beyond the channel: nothing reaches the instrument, the run fails as on a trip
            log.warning("channel %s: step %d of run %s %s", self.channel, cmd.step_index, run.run_id, refused.message)
            self._safe_state()
            run.tripped = refused
            await self.bus.publish(self._t("event"), started)
            await self._publish_step_end(cmd, run, refused, StepStats())
            await self._publish_status(force=True, state=ChannelState.fault, message=refused.message)
            return
        if self.control.pause.is_set():  # paused between steps (or during a device-run technique): hold here
            self._safe_state()
            while self.control.pause.is_set() and not self.control.abort.is_set():
                await self._publish_status(state=ChannelState.paused, cmd=cmd, message="paused before this step")
                await asyncio.sleep(0.05)
        await self.bus.publish(self._t("event"), started)
        await self._publish_status(force=True, state=ChannelState.running, cmd=cmd)
        run.step_running = True
        self.control.begin_step(cmd)
        try:
            assert self._loop is not None
            reason, stats = await self._loop.run_in_executor(
                self._step_thread, self._step_loop(cmd).run, cmd, limits, run
            )
        finally:
            run.step_running = False
            self.control.end_step()
            run.heard_from_flow()
        if reason.kind == "safety_limit":
            run.tripped = reason
        await self._publish_step_end(cmd, run, reason, stats)
        state = (
            ChannelState.fault
            if run.tripped
            else (ChannelState.paused if self.control.pause.is_set() else ChannelState.running)
        )
        # Between steps the status names no step: a resuming flow that missed the step's end event (events are
        # not retained) learns from the retained status that the step is over.
        await self._publish_status(force=True, state=state)

    def _step_loop(self, cmd: StepCommand) -> StepLoop:
        """The sample loop of one step on this channel's instrument, with this agent publishing for it."""
        return StepLoop(
            channel=self.channel,
            channel_limits=self.channel_limits,
            driver=self.driver,
            clock=self.clock,
            control=self.control,
            techniques=Techniques(self.driver, self.clock, self.control, self.channel, self.driver_name),
            host=self,
            batch_size=PACED_BATCH_SIZE if self._paced(cmd) else self.batch_size,
            batch_max_wall_s=self.batch_max_wall_s,
        )

    def _paced(self, cmd: StepCommand) -> bool:
        return self.pace is not None and cmd.run_id in self._paced_runs

    async def _publish_step_end(self, cmd: StepCommand, run: RunContext, reason: EndReason, stats: StepStats) -> None:
        ended = self._step_event(cmd, "ended", run.last_time_s, reason, stats)
        run.ended[cmd.step_index] = ended
        await self.bus.publish(self._t("event"), ended)

    # ------------------------------------------------------------------ the sample loop's host (step thread)

    def _emit(self, coro: Coroutine[Any, Any, None], force: bool = False) -> None:
        """From the step thread: hand a status publish to the event loop and never wait for it (the network is
        not in the safety loop). While the last one is still waiting (a full outbox, the broker away), a
        periodic one is dropped: a status is latest-wins, and the retained one is rewritten at the next."""
        assert self._loop is not None
        pending = self._status_pending
        if pending is not None and not pending.done() and not force:
            coro.close()
            return
        self._status_pending = asyncio.run_coroutine_threadsafe(coro, self._loop)

    def publish_batch(self, batch: SampleBatch) -> None:
        """From the step thread: into the spool (a local disk write), published by the event loop's pump."""
        self._journal(self._t("data"), encode(batch), batch.run_id, batch.seq)
        if self.pace is not None and batch.run_id in self._paced_runs and batch.time_s:
            # One batch may be in flight: wait until the twin has followed the one before it.
            previous_end_s = self._paced_previous_end_s.get(batch.run_id)
            self._paced_previous_end_s[batch.run_id] = batch.time_s[-1]
            if previous_end_s is not None:
                self.pace(batch.run_id, previous_end_s, self._pace_interrupted)

    def _pace_interrupted(self) -> bool:
        return self.control.abort.is_set() or self.control.pause.is_set()

    def publish_step_status(self, cmd: StepCommand, paused_message: str | None = None) -> None:
        """A live status from the step thread: at most every status_every_wall_s, at once when a limit paused."""
        if paused_message is not None:
            status = self._publish_status(force=True, state=ChannelState.paused, cmd=cmd, message=paused_message)
            self._emit(status, force=True)
        elif time.monotonic() - self._last_status_wall > self.status_every_wall_s:
            self._emit(self._publish_status(cmd=cmd))

    def safe_state(self) -> None:
        self._safe_state()

    def rest_between_steps(self) -> None:
        """A step that ended on its condition leaves the cell at open circuit until the next command
        arrives: the flow's round trip (tens of ms, or minutes of cell time on an emulator running
        hundreds of times faster than the wall) must not go on charging or discharging the cell past
        the condition that ended the step. On a virtual clock no time passes, so nothing changes."""
        try:
            self.driver.open_circuit()
        except Exception:
            log.exception("channel %s: could not rest the cell after a step; turning the output off", self.channel)
            self._safe_state()

    def _safe_state(self) -> None:
        try:
            self.driver.output_off()
        except Exception:  # the instrument may be the thing that failed; say so loudly
            log.exception("channel %s: could not put the instrument in its safe state", self.channel)

    # ------------------------------------------------------------------ status

    def _status(self, state: ChannelState, message: str = "", cmd: StepCommand | None = None) -> ChannelStatus:
        r = self.control.last_reading
        cmd = cmd or self.control.current
        # Idle and paused channels hold their cell at open circuit: no current flows, whatever the last
        # reading of the step before said (a tile showed an idle channel at the last step's 0.5 mA).
        at_open_circuit = state in (ChannelState.idle, ChannelState.paused)
        return ChannelStatus(
            channel=self.channel,
            state=state,
            cell_id=self.cell_id,
            driver=self.driver_name,
            speed=self.clock.speed,
            run_id=self.run.run_id if self.run and not self.run.restarted else None,
            step_index=cmd.step_index if cmd else None,
            label=cmd.label if cmd else None,
            cycle=cmd.cycle if cmd else None,
            voltage_V=r.voltage_V if r else None,
            current_A=(0.0 if at_open_circuit else r.current_A) if r else None,
            temperature_C=r.temperature_C if r and not math.isnan(r.temperature_C) else None,
            message=message,
            limits=self.channel_limits,
            nominal_capacity_Ah=self.nominal_capacity_Ah,
        )

    async def _publish_status(
        self, force: bool = False, state: ChannelState | None = None, cmd: StepCommand | None = None, message: str = ""
    ) -> None:
        if state is not None:
            self._state = state
        now = time.monotonic()
        if not force and now - self._last_status_wall < self.status_every_wall_s:
            return
        self._last_status_wall = now
        await self.bus.publish(self._t("status"), self._status(self._state, message, cmd), retain=True)


def _cut_steps(run: RunContext) -> list[int]:
    """The steps of the run an agent restart cut (ended error:agent_restart): a resume runs them again."""
    return [i for i, e in run.ended.items() if e.reason is not None and e.reason.name == "agent_restart"]


def _finished_runs(spool: Spool, current: str | None) -> list[tuple[str, Any]]:
    """The RunStop entries of the runs the spool holds, but the current one."""
    return [
        (run_id, entry)
        for run_id in spool.run_ids()
        if run_id != current
        for entry in spool.events(run_id)
        if isinstance(_decoded(entry.topic, entry.payload), RunStop)
    ]


def _decoded(topic_name: str, payload: bytes) -> object:
    try:
        return decode(topic_name, payload)
    except MalformedPayload:  # a spool entry this version cannot read: not a RunStop to announce
        return None


class _SpooledBus:
    """The agent's view of its bus: a batch or event goes into the spool (and out through the pump, in order);
    anything else (a retained status) waits until the spool is handed over, then goes straight to the bus, so
    a status never overtakes the events before it."""

    _SPOOLED_KINDS = frozenset({"data", "event"})

    def __init__(self, agent: Agent, bus: Bus) -> None:
        self._agent = agent
        self._bus = bus

    async def publish(self, topic_name: str, payload: BaseModel | bytes, *, qos: int = 1, retain: bool = False) -> None:
        if topic_name.rsplit("/", 1)[-1] in self._SPOOLED_KINDS and not retain and qos == 1:
            data = payload if isinstance(payload, (bytes, bytearray)) else encode(payload)
            self._agent._journal(topic_name, bytes(data), getattr(payload, "run_id", None))
            return
        await self._agent._drain_spool()
        await self._bus.publish(topic_name, payload, qos=qos, retain=retain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bus, name)
