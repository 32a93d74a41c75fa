"""The channel agent: runs steps on one instrument, enforces safety every sample, streams documents.

One agent per channel, on the PC next to the instrument. The step loop runs
in the agent's own thread (drivers block on I/O; the event loop must keep
receiving commands such as an abort while a step runs). Not asyncio's shared
default pool: a step holds its thread for the whole step, and aiomqtt connects
through that pool, so N channels in one process could starve every reconnect. Every sample is checked against
the channel's limits tightened by the command's own, in this process: the
network is never inside the safety loop. Whatever happens (a limit, an
abort, an exception, a cancelled task) the instrument is put in its safe
state in this module's own ``finally``.

Documents out: RunStart on a StartRun command, StepEvent started/ended per
step, SampleBatch every ``batch_size`` samples (or sooner when samples come
slowly: at most ``batch_max_wall_s`` = 0.1 s of wall time, so a live view stays live and
the twin sees a real-time sample within its 200 ms anomaly budget), RunStop on StopRun. Sequence numbers run
per run without gaps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from labtwin import bus as busmod
from labtwin.agent.safety import IMMEDIATE, TripDelay, VoltageSlope, check_end, check_limits
from labtwin.bus import Bus
from labtwin.devices.clock import Clock
from labtwin.devices.potentiostat import Potentiostat, Reading, RunsTechniques
from labtwin.documents import (
    DVDT_WINDOW_SAMPLES,
    ChannelState,
    ChannelStatus,
    EndReason,
    EndStep,
    Limits,
    PauseRun,
    ResumeRun,
    RunStart,
    RunStop,
    SampleBatch,
    StartRun,
    StepCommand,
    StepEvent,
    StepKind,
    StepStats,
    StopRun,
)

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the agent tracks for the run in progress."""

    run_id: str
    cell_id: str
    protocol: str
    n_steps: int
    start_cell_s: float
    capacity_Ah: float = 0.0
    next_seq: int = 0
    n_samples: int = 0
    n_batches: int = 0
    tripped: EndReason | None = None
    last_time_s: float = 0.0
    last_command_wall: float = field(default_factory=time.monotonic)
    step_running: bool = False
    ended: dict[int, StepEvent] = field(default_factory=dict)  # how each step of this run ended, by index


_COLUMNS = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")
_IMPEDANCE_COLUMNS = ("frequency_Hz", "z_real_ohm", "z_imag_ohm")


@dataclass
class _BatchBuilder:
    run_id: str
    channel: str
    columns: dict[str, list] = field(default_factory=lambda: {k: [] for k in _COLUMNS + _IMPEDANCE_COLUMNS})
    impedance: bool = False

    def add(
        self, t: float, v: float, i: float, q: float, temp: float, step: int, cycle: int, reading: Reading | None = None
    ) -> None:
        c = self.columns
        c["time_s"].append(t)
        c["voltage_V"].append(v)
        c["current_A"].append(i)
        c["capacity_Ah"].append(q)
        c["temperature_C"].append(None if math.isnan(temp) else temp)  # no sensor: null on the wire, NULL in the store
        c["step"].append(step)
        c["cycle"].append(cycle)
        if reading is not None and reading.frequency_Hz is not None:
            self.impedance = True
            c["frequency_Hz"].append(reading.frequency_Hz)
            c["z_real_ohm"].append(reading.z_real_ohm)
            c["z_imag_ohm"].append(reading.z_imag_ohm)

    def __len__(self) -> int:
        return len(self.columns["time_s"])

    def take(self, seq: int) -> SampleBatch:
        data = {k: self.columns[k] for k in _COLUMNS}
        if self.impedance:
            if len(self.columns["frequency_Hz"]) != len(self.columns["time_s"]):
                raise ValueError("an impedance batch mixes points with and without a frequency")
            data.update({k: self.columns[k] for k in _IMPEDANCE_COLUMNS})
        batch = SampleBatch.model_construct(
            run_id=self.run_id, channel=self.channel, seq=seq, v=1, kind="samples", **data
        )
        self.columns = {k: [] for k in self.columns}
        self.impedance = False
        return batch


class Agent:
    """Serves one channel: commands in on .../cmd, documents out on .../event, .../data, .../status."""

    def __init__(
        self,
        *,
        lab: str,
        channel: str,
        driver: Potentiostat,
        clock: Clock,
        broker_url: str,
        channel_limits: Limits,
        cell_id: str,
        nominal_capacity_Ah: float | None = None,
        driver_name: str = "",
        batch_size: int = 100,
        batch_max_wall_s: float = 0.1,
        status_every_wall_s: float = 1.0,
        lease_grace_s: float = 60.0,
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
        self.batch_max_wall_s = batch_max_wall_s
        self.status_every_wall_s = status_every_wall_s
        self.lease_grace_s = lease_grace_s
        self.run: RunContext | None = None
        self._abort = threading.Event()
        self._pause = threading.Event()  # set by PauseRun, cleared by ResumeRun; read by the step thread
        self._pausing = False  # the step thread: the reading just yielded was taken while paused
        self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"step-{channel}")
        self._bus: Bus | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = asyncio.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._last_status_wall = 0.0
        self._state = ChannelState.idle
        self._last_reading: Reading | None = None
        self._current_cmd: StepCommand | None = None  # the step running, for statuses sent from elsewhere
        self._end_request: tuple[int, EndReason] | None = None  # EndStep from the flow, for the step running

    # ------------------------------------------------------------------ topics

    def _t(self, kind: str) -> str:
        return busmod.topic(self.lab, self.channel, kind)

    # ------------------------------------------------------------------ service

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever), reconnecting to the broker as needed."""
        self._loop = asyncio.get_running_loop()
        will = (self._t("status"), busmod.offline_status(self.channel))
        async with Bus(self.broker_url, f"agent-{self.lab}-{self.channel}", will=will, persistent=True) as bus:
            self._bus = bus
            commands = await bus.subscribe(self._t("cmd"))
            await self._publish_status(force=True)
            self._ready.set()
            executor = asyncio.create_task(self._execute_commands())
            receiver = asyncio.create_task(self._receive(commands))
            waiters = [executor, receiver]
            if stop is not None:
                waiters.append(asyncio.create_task(stop.wait()))
            try:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None:
                        raise task.exception()
            finally:
                self._abort.set()
                for task in waiters:
                    task.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
                self._safe_state()
                self._step_thread.shutdown(wait=False)
                await bus.publish(self._t("status"), self._status(ChannelState.offline, "agent stopped"), retain=True)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def _receive(self, commands: busmod.Subscription) -> None:
        async for message in commands:
            doc = message.document
            if isinstance(doc, StopRun) and doc.exit_status != "success" and self.run and doc.run_id == self.run.run_id:
                self._abort.set()  # takes effect within one sample of the running step
            if isinstance(doc, EndStep):
                cmd = self._current_cmd
                if (
                    self.run is not None
                    and doc.run_id == self.run.run_id
                    and cmd is not None
                    and cmd.step_index == doc.step_index
                ):
                    self._end_request = (doc.step_index, doc.reason)  # read by the step thread at its next sample
                continue
            if isinstance(doc, (PauseRun, ResumeRun)):
                # Not queued behind the running step: a pause acts within one sample of it.
                if self.run is not None and doc.run_id == self.run.run_id:
                    if isinstance(doc, PauseRun):
                        self._pause.set()
                        log.warning("channel %s: run %s paused: %s", self.channel, doc.run_id, doc.reason)
                        await self._publish_status(
                            force=True, state=ChannelState.paused, message=f"paused: {doc.reason}"
                        )
                    else:
                        self._pause.clear()
                        await self._publish_status(force=True, state=ChannelState.running, message="resumed")
                continue
            await self._queue.put(doc)

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
            return  # a repeated StartRun (QoS 1 duplicate): already started
        if self.run is not None:
            # The run in progress is the channel's lease: a step running, or a flow that sent a command less
            # than lease_grace_s ago, keeps it and the newcomer is refused (its flow sees the status and waits).
            # A run whose flow has gone quiet that long was abandoned (its flow was killed): it gives way.
            quiet_s = time.monotonic() - self.run.last_command_wall
            if self.run.step_running or quiet_s < self.lease_grace_s:
                log.warning("channel %s: refused run %s: busy with run %s", self.channel, cmd.run_id, self.run.run_id)
                await self._publish_status(
                    force=True, state=self._state, message=f"refused run {cmd.run_id}: busy with run {self.run.run_id}"
                )
                return
            await self._finish_run(
                self.run,
                "aborted",
                f"abandoned: no command from its flow for {quiet_s:.0f} s; superseded by run {cmd.run_id}",
            )
        self._abort.clear()
        self._pause.clear()
        self.run = RunContext(cmd.run_id, cmd.cell_id, cmd.protocol, cmd.n_steps, start_cell_s=self.clock.now())
        if cmd.resume is not None:  # continue the interrupted run's record where the store has it
            r = cmd.resume
            self.run.start_cell_s -= r.time_s
            self.run.last_time_s, self.run.capacity_Ah = r.time_s, r.capacity_Ah
            self.run.next_seq, self.run.n_samples = r.next_seq, r.n_samples
        doc = RunStart(
            run_id=cmd.run_id,
            lab=self.lab,
            channel=self.channel,
            cell_id=cmd.cell_id or self.cell_id,
            protocol=cmd.protocol,
            n_steps=cmd.n_steps,
            flow_run_id=cmd.flow_run_id,
            metadata=cmd.metadata,
        )
        await self._bus.publish(self._t("event"), doc)
        await self._publish_status(force=True, state=ChannelState.running)

    async def _stop_run(self, cmd: StopRun) -> None:
        run = self.run
        if run is None or run.run_id != cmd.run_id:
            return
        status = cmd.exit_status
        if run.tripped is not None and status == "success":
            status = "failed"
        await self._finish_run(run, status, cmd.reason or (run.tripped.name if run.tripped else ""))

    async def _finish_run(self, run: RunContext, status: str, reason: str) -> None:
        self._pause.clear()
        self._safe_state()
        await self._bus.publish(
            self._t("event"),
            RunStop(
                run_id=run.run_id,
                channel=self.channel,
                exit_status=status,
                reason=reason,
                n_samples=run.n_samples,
                n_batches=run.n_batches,
                last_seq=run.next_seq - 1,
                cell_time_s=run.last_time_s,
            ),
        )
        self.run = None
        await self._publish_status(force=True, state=ChannelState.idle)

    # ------------------------------------------------------------------ steps

    async def _run_step(self, cmd: StepCommand) -> None:
        run = self.run
        if run is None or run.run_id != cmd.run_id:
            # A step of a run this agent did not start (e.g. after an agent restart): start it implicitly.
            await self._start_run(
                StartRun(run_id=cmd.run_id, channel=self.channel, cell_id=self.cell_id, protocol="", n_steps=0)
            )
            if self.run is None or self.run.run_id != cmd.run_id:  # refused: the channel is another run's
                await self._bus.publish(
                    self._t("event"),
                    StepEvent(
                        run_id=cmd.run_id,
                        channel=self.channel,
                        step_index=cmd.step_index,
                        label=cmd.label,
                        cycle=cmd.cycle,
                        step=cmd.step,
                        event="ended",
                        time_s=0.0,
                        reason=EndReason(
                            kind="error",
                            name="channel_busy",
                            message=f"channel busy with run {self.run.run_id if self.run else '?'}",
                        ),
                        stats=StepStats(),
                    ),
                )
                return
            run = self.run
        run.last_command_wall = time.monotonic()
        if cmd.step_index in run.ended:
            # A step this run already ran: a QoS 1 redelivery, or a flow that sent it again after losing track
            # (a Prefect API error around the task run). Say again how it ended; never run a step twice.
            log.info(
                "channel %s: step %d of run %s already ran; repeating its end", self.channel, cmd.step_index, run.run_id
            )
            await self._bus.publish(self._t("event"), run.ended[cmd.step_index])
            return
        limits = self.channel_limits.tighten(cmd.limits)
        started = StepEvent(
            run_id=cmd.run_id,
            channel=self.channel,
            step_index=cmd.step_index,
            label=cmd.label,
            cycle=cmd.cycle,
            step=cmd.step,
            event="started",
            time_s=run.last_time_s,
        )
        if run.tripped is not None:
            reason = EndReason(
                kind="error", name="run_tripped", message=f"run stopped by safety limit {run.tripped.name}"
            )
            await self._bus.publish(self._t("event"), started)
            await self._publish_step_end(cmd, run, reason, StepStats())
            return
        if self._abort.is_set():
            reason = EndReason(kind="aborted", name="abort", message="run was aborted")
            await self._publish_step_end(cmd, run, reason, StepStats())
            return
        if self._pause.is_set():  # paused between steps (or during a device-run technique): hold here
            self._safe_state()
            while self._pause.is_set() and not self._abort.is_set():
                await self._publish_status(state=ChannelState.paused, cmd=cmd, message="paused before this step")
                await asyncio.sleep(0.05)
        await self._bus.publish(self._t("event"), started)
        await self._publish_status(force=True, state=ChannelState.running, cmd=cmd)
        run.step_running, self._current_cmd = True, cmd
        try:
            reason, stats = await self._loop.run_in_executor(self._step_thread, self._step_loop, cmd, limits, run)
        finally:
            run.step_running, self._current_cmd = False, None
            run.last_command_wall = time.monotonic()
        if reason.kind == "safety_limit":
            run.tripped = reason
        await self._publish_step_end(cmd, run, reason, stats)
        state = (
            ChannelState.fault
            if run.tripped
            else (ChannelState.paused if self._pause.is_set() else ChannelState.running)
        )
        # Between steps the status names no step: a resuming flow that missed the step's end event (events are
        # not retained) learns from the retained status that the step is over.
        await self._publish_status(force=True, state=state)

    async def _publish_step_end(self, cmd: StepCommand, run: RunContext, reason: EndReason, stats: StepStats) -> None:
        ended = StepEvent(
            run_id=cmd.run_id,
            channel=self.channel,
            step_index=cmd.step_index,
            label=cmd.label,
            cycle=cmd.cycle,
            step=cmd.step,
            event="ended",
            time_s=run.last_time_s,
            reason=reason,
            stats=stats,
        )
        run.ended[cmd.step_index] = ended
        await self._bus.publish(self._t("event"), ended)

    def _emit(self, coro) -> None:
        """From the step thread: hand a publish to the event loop and wait until it is queued
        (back-pressure: a full outbox slows the step loop instead of dropping samples)."""
        asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _samples(self, cmd: StepCommand, limits: Limits) -> tuple[Iterator[Reading], Callable[[], None]]:
        """The readings of a step, host-timed or device-run, and how to stop it early."""
        driver = self.driver
        if isinstance(driver, RunsTechniques) and driver.supports(cmd.step):
            return driver.run_technique(cmd), driver.abort
        clock = self.clock

        def compliance_for(current_A: float) -> float:
            """The source's hardware voltage limit: a backstop 2 % beyond the safety limit, so the
            agent's own check trips first (and records why) while the instrument still clamps."""
            v = limits.voltage_max_V if current_A > 0 else limits.voltage_min_V
            if v is None:
                return math.copysign(1e3, current_A)
            return v + math.copysign(0.02 * max(abs(v), 0.1), current_A)

        current_limit = limits.current_max_A if limits.current_max_A else 1e3

        def power_current_A(voltage_V: float) -> float:
            """Constant power as the current P / V at the last measured voltage (a floor of 10 mV keeps it finite),
            held within the step's current limit: re-set every sample, as a host-timed cycler does."""
            current = cmd.power_W / max(abs(voltage_V), 0.01)
            return math.copysign(min(abs(current), current_limit), current)

        def apply_setting() -> None:
            """The source setting of a host-timed step (again after a pause)."""
            if cmd.step is StepKind.rest:
                driver.open_circuit()
            elif cmd.step is StepKind.cp:
                v = self._last_reading.voltage_V if self._last_reading is not None else driver.read().voltage_V
                current = power_current_A(v)
                compliance = compliance_for(current)
                if cmd.end.voltage_V is not None:
                    compliance = (
                        min(compliance, cmd.end.voltage_V) if current > 0 else max(compliance, cmd.end.voltage_V)
                    )
                driver.set_current(current, compliance)
            elif cmd.step is StepKind.cc:
                # The source's own voltage limit sits at the step's end voltage when it has one (as a
                # cycler's CC step does): a cell whose voltage jumps within a sample (an emptied host)
                # is clamped there and ends the step, instead of running on to the safety limit.
                compliance = compliance_for(cmd.current_A)
                if cmd.end.voltage_V is not None:
                    compliance = (
                        min(compliance, cmd.end.voltage_V) if cmd.current_A > 0 else max(compliance, cmd.end.voltage_V)
                    )
                driver.set_current(cmd.current_A, compliance)
            elif cmd.step is StepKind.cv:
                driver.set_voltage(cmd.voltage_V, current_limit)
            elif cmd.step is StepKind.cccv:
                # An SMU in current mode with its voltage limit at the CV setpoint IS a CCCV source:
                # it regulates at the limit once the cell gets there, and the current tapers.
                driver.set_current(cmd.current_A, cmd.voltage_V)

        def every_interval() -> Iterator[Reading]:
            while True:
                if self._pause.is_set() and not self._abort.is_set():
                    # Paused: open circuit within this sample, keep sampling (limits still checked), re-apply on resume.
                    driver.open_circuit()
                    while self._pause.is_set() and not self._abort.is_set():
                        clock.sleep(cmd.sample_interval_s)
                        if clock.speed is None:
                            time.sleep(
                                0.02
                            )  # at max speed a pause must not spin out rest samples as fast as the CPU allows
                        self._pausing = True
                        yield driver.read()
                    self._pausing = False
                    if self._abort.is_set():
                        return
                    apply_setting()
                clock.sleep(cmd.sample_interval_s)
                reading = driver.read()
                yield reading
                if cmd.step is StepKind.cp and not self._pause.is_set():
                    self._last_reading = reading
                    apply_setting()

        if cmd.step in (StepKind.rest, StepKind.cc, StepKind.cv, StepKind.cccv, StepKind.cp):
            apply_setting()
            return every_interval(), lambda: None
        if cmd.step is StepKind.gitt:
            return self._gitt(cmd, compliance_for(cmd.current_A)), lambda: None
        if cmd.step is StepKind.cyclic_voltammetry:
            return self._sweep(cmd, current_limit), lambda: None
        if cmd.step is StepKind.eis:
            raise ValueError(
                f"channel {self.channel}: driver {self.driver_name or type(driver).__name__} cannot run impedance "
                "(EIS needs a frequency response analyser: a device-run technique)"
            )
        raise ValueError(f"unsupported step {cmd.step}")  # pragma: no cover - StepKind is closed

    def _gitt(self, cmd: StepCommand, compliance_V: float) -> Iterator[Reading]:
        """Pulses and relaxations on a host-timed source, until a pulse reaches the cut-off voltage.

        The pulse that reaches the cut-off ends there (the source's voltage limit sits at the cut-off,
        as in a cc step with an end voltage, and the pulse stops at the first sample beyond it) and is
        still followed by its relaxation, so the last relaxed voltage is measured too. Running the
        last pulse to its full length would drive the cell into the safety limit instead."""
        g, driver, clock = cmd.gitt, self.driver, self.clock
        cutoff = cmd.end.voltage_V
        if cutoff is not None:
            compliance_V = min(compliance_V, cutoff) if cmd.current_A > 0 else max(compliance_V, cutoff)

        def beyond(reading: Reading) -> bool:
            return cutoff is not None and (
                (cmd.current_A > 0 and reading.voltage_V >= cutoff - 1e-6)
                or (cmd.current_A < 0 and reading.voltage_V <= cutoff + 1e-6)
            )

        for _ in range(g.max_pulses):
            driver.set_current(cmd.current_A, compliance_V)
            reached = False
            for _ in range(max(1, int(round(g.pulse_s / cmd.sample_interval_s)))):
                clock.sleep(cmd.sample_interval_s)
                reading = driver.read()
                yield reading
                if beyond(reading):
                    reached = True
                    break
            driver.open_circuit()
            for _ in range(max(1, int(round(g.relax_s / cmd.sample_interval_s)))):
                clock.sleep(cmd.sample_interval_s)
                yield driver.read()
            if reached:
                return

    def _sweep(self, cmd: StepCommand, current_limit_A: float) -> Iterator[Reading]:
        """Cyclic voltammetry as a staircase: one potential step per sample, held for step_V / scan rate."""
        sweep, driver, clock = cmd.sweep, self.driver, self.clock
        dwell = sweep.step_V / sweep.scan_rate_V_s
        for potential in sweep.potentials_V():
            driver.set_voltage(potential, current_limit_A)
            clock.sleep(dwell)
            yield driver.read()

    def _step_loop(self, cmd: StepCommand, limits: Limits, run: RunContext) -> tuple[EndReason, StepStats]:
        """The safety loop: every sample is checked here before anything else happens with it."""
        batch = _BatchBuilder(cmd.run_id, self.channel)
        stats = StepStats()
        step_start_s = self.clock.now()
        step_start_run_s = step_start_s - run.start_cell_s
        step_start_q = run.capacity_Ah
        last_flush = time.monotonic()
        prev_t, prev_i, prev_v = 0.0, 0.0, None
        reason: EndReason | None = None
        readings: Iterator[Reading] = iter(())
        stop_device: Callable[[], None] = lambda: None
        # A step aborted while paused leaves its generator suspended inside the pause (it never clears the
        # flag): without this the next step would count all its time as paused and never end on time.
        self._pausing = False
        self._end_request = None
        slope = VoltageSlope(DVDT_WINDOW_SAMPLES) if cmd.end.dvdt_V_per_h is not None else None
        rule = cmd.record
        last_rec: tuple[float, float, float] | None = None  # (step time, V, I) of the last recorded reading
        trip = TripDelay(limits.trip_delay_s)
        hard_trip = TripDelay(self.channel_limits.trip_delay_s)
        # Host-timed steps can hold at open circuit and go on; a device-run technique, a GITT or a sweep cannot.
        can_pause = (
            limits.action == "pause"
            and cmd.step in (StepKind.rest, StepKind.cc, StepKind.cv, StepKind.cccv, StepKind.cp)
            and not (isinstance(self.driver, RunsTechniques) and self.driver.supports(cmd.step))
        )
        dvdt: float | None = None
        try:
            # Inside the try: configuring the source talks to the instrument too, and a dead link there
            # must end the step with its reason (and output off), not kill the agent's executor.
            readings, stop_device = self._samples(cmd, limits)
            paused_s = 0.0  # time spent paused does not count toward the step's time conditions and limit
            for reading in readings:
                step_t = reading.time_s if reading.time_s is not None else self.clock.now() - step_start_s
                paused_now = self._pausing
                if paused_now:
                    paused_s += step_t - prev_t
                active_t = step_t - paused_s
                v, i, temp = reading.voltage_V, reading.current_A, reading.temperature_C
                # The channel's own limits are the lab's hard limits: they trip on their own terms (immediately unless
                # the lab file gives a delay) and always stop. A protocol's delay and pause apply to its own limits.
                # Charge of this step up to the previous sample (this one's share is added just below).
                step_q = run.capacity_Ah - step_start_q
                hard = hard_trip.check(check_limits(self.channel_limits, v, i, temp, active_t, step_q), step_t)
                reason = hard or trip.check(check_limits(limits, v, i, temp, active_t, step_q), step_t)
                if (
                    reason is not None
                    and hard is None
                    and can_pause
                    and not paused_now
                    and reason.name not in IMMEDIATE
                ):
                    # action: pause. Open circuit within this sample; the step waits for `labtwin resume`. A limit
                    # still exceeded at open circuit (paused_now) is not something a pause can fix: it stops.
                    self.driver.open_circuit()
                    self._pause.set()
                    trip.reset()
                    log.warning(
                        "channel %s: %s tripped (%s): run %s paused",
                        self.channel,
                        reason.name,
                        reason.value,
                        run.run_id,
                    )
                    self._emit(
                        self._publish_status(
                            force=True,
                            state=ChannelState.paused,
                            cmd=cmd,
                            message=f"paused by safety limit {reason.name}: {reason.value:.6g} beyond {reason.threshold:g}",
                        )
                    )
                    reason = None
                if reason is not None:
                    self._safe_state()  # within this sample, before anything is published
                    stop_device()
                # Charge bookkeeping (trapezoid); signed, positive = charged in.
                dq = 0.5 * (i + prev_i) * (step_t - prev_t) / 3600.0 if stats.n_samples else i * step_t / 3600.0
                run.capacity_Ah += dq
                if dq >= 0:
                    stats.charge_Ah += dq
                    stats.energy_in_Wh += dq * v
                else:
                    stats.discharge_Ah -= dq
                    stats.energy_out_Wh -= dq * v
                prev_t, prev_i, prev_v = step_t, i, v
                if stats.start_voltage_V is None:
                    stats.start_voltage_V = v
                t_run = run.last_time_s = step_start_run_s + step_t
                stats.duration_s = step_t
                self._last_reading = reading
                if reason is None and not paused_now:
                    if slope is not None:
                        dvdt = slope.add(active_t, v)
                    setpoint = cmd.current_A if cmd.current_A is not None else cmd.power_W
                    reason = check_end(
                        cmd.step, cmd.end, setpoint, v, i, active_t, abs(run.capacity_Ah - step_start_q), dvdt
                    )
                request = self._end_request
                if reason is None and request is not None and request[0] == cmd.step_index and not paused_now:
                    reason = request[1]
                    stop_device()
                if reason is None and self._abort.is_set():
                    reason = EndReason(kind="aborted", name="abort", message="run aborted on request")
                    stop_device()
                # Every reading was checked above; the record keeps those its rule asks for, and a step's first and last.
                if (
                    rule is None
                    or last_rec is None
                    or reason is not None
                    or rule.due(step_t - last_rec[0], v - last_rec[1], i - last_rec[2])
                ):
                    last_rec = (step_t, v, i)
                    stats.n_samples += 1
                    run.n_samples += 1
                    batch.add(t_run, v, i, run.capacity_Ah, temp, cmd.step_index, cmd.cycle, reading)
                now = time.monotonic()
                if len(batch) and (
                    reason is not None or len(batch) >= self.batch_size or now - last_flush > self.batch_max_wall_s
                ):
                    self._flush(batch, run, stats)
                    last_flush = now
                    if now - self._last_status_wall > self.status_every_wall_s:
                        self._emit(self._publish_status(cmd=cmd))
                if reason is not None:
                    break
            if reason is None:
                reason = EndReason(kind="end_condition", name="technique_complete")
        except Exception as exc:
            log.exception("channel %s: step %d failed", self.channel, cmd.step_index)
            reason = EndReason(kind="error", name=type(exc).__name__, message=str(exc))
            self._safe_state()
        finally:
            if reason is None or reason.kind != "end_condition":
                self._safe_state()
            elif cmd.step is not StepKind.rest:
                self._rest_between_steps()
            if len(batch):
                self._flush(batch, run, stats)
            close = getattr(readings, "close", None)
            if close is not None:
                close()
        stats.end_voltage_V = prev_v
        stats.end_current_A = prev_i
        return reason, stats

    def _flush(self, batch: _BatchBuilder, run: RunContext, stats: StepStats) -> None:
        seq = run.next_seq
        run.next_seq += 1
        run.n_batches += 1
        if stats.first_seq is None:
            stats.first_seq = seq
        stats.last_seq = seq
        self._emit(self._bus.publish(self._t("data"), batch.take(seq)))

    def _rest_between_steps(self) -> None:
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
        r = self._last_reading
        cmd = cmd or self._current_cmd
        return ChannelStatus(
            channel=self.channel,
            state=state,
            cell_id=self.cell_id,
            driver=self.driver_name,
            speed=self.clock.speed,
            run_id=self.run.run_id if self.run else None,
            step_index=cmd.step_index if cmd else None,
            label=cmd.label if cmd else None,
            cycle=cmd.cycle if cmd else None,
            voltage_V=r.voltage_V if r else None,
            current_A=r.current_A if r else None,
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
        await self._bus.publish(self._t("status"), self._status(self._state, message, cmd), retain=True)
