"""The per-sample loop of a step: every reading is checked against the safety limits before anything else.

This is the safety loop, next to the instrument: the network is never inside it. Per reading, in order:
the channel's hard limits and the step's own limits (safety.py, with their trip delays; a limit whose
action is ``pause`` holds the cell at open circuit instead of stopping), the step's charge bookkeeping,
its end conditions, an EndStep from the flow, an abort; then the record rule decides whether the
reading is kept, and the batcher whether a batch goes out. Last, for a host-timed hold, the check
planner (check_interval.py) says when to read next: sooner than the step's sample interval when the
cell nears an end condition or a limit, so a cut-off is met within a few mV whatever the record
interval. Whatever ends the step (a limit, an abort, an exception), the instrument is put in its safe
state here, within that sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from labtwin.agent.batching import Batcher
from labtwin.agent.check_interval import CheckPlanner, min_read_interval_s
from labtwin.agent.control import StepControl
from labtwin.agent.lease import RunContext
from labtwin.agent.safety import IMMEDIATE, TripDelay, VoltageSlope, check_end, check_limits
from labtwin.agent.techniques import HOST_TIMED_HOLDS, Techniques
from labtwin.devices.clock import Clock
from labtwin.devices.potentiostat import Potentiostat, Reading
from labtwin.documents import (
    DVDT_WINDOW_SAMPLES,
    EndReason,
    Limits,
    RecordRule,
    SampleBatch,
    StepCommand,
    StepKind,
    StepStats,
)

log = logging.getLogger(__name__)


def _nothing_to_stop() -> None:
    """A host-timed step stops with its loop: the device has nothing of its own to abort."""


class StepHost(Protocol):
    """What the sample loop needs of its agent: publishing from the step thread, and the instrument's states."""

    def publish_batch(self, batch: SampleBatch) -> None: ...

    def publish_step_status(self, cmd: StepCommand, paused_message: str | None = None) -> None: ...

    def safe_state(self) -> None: ...

    def rest_between_steps(self) -> None: ...


@dataclass
class ChargeCounter:
    """A step's charge and energy by the trapezoid rule, added to the run's net charge as it goes.

    Signed: positive is charge put in. The step's charge and discharge are kept apart (StepStats), and
    the run's ``capacity_Ah`` is the net charge since the run started."""

    run: RunContext
    stats: StepStats
    start_Ah: float
    prev_time_s: float = 0.0
    prev_current_A: float = 0.0
    prev_voltage_V: float | None = None

    @property
    def step_Ah(self) -> float:
        """Net charge of this step so far."""
        return self.run.capacity_Ah - self.start_Ah

    def add(self, time_s: float, voltage_V: float, current_A: float) -> None:
        stats = self.stats
        if not (math.isfinite(voltage_V) and math.isfinite(current_A)):
            # A reading with no number (the check trips on it) carries no charge: the trapezoid bridges it,
            # so the run's capacity and the step's energy stay numbers every document can carry.
            stats.duration_s = time_s
            return
        if stats.n_samples:
            dq = 0.5 * (current_A + self.prev_current_A) * (time_s - self.prev_time_s) / 3600.0
        else:
            dq = current_A * time_s / 3600.0
        self.run.capacity_Ah += dq
        if dq >= 0:
            stats.charge_Ah += dq
            stats.energy_in_Wh += dq * voltage_V
        else:
            stats.discharge_Ah -= dq
            stats.energy_out_Wh -= dq * voltage_V
        self.prev_time_s, self.prev_current_A, self.prev_voltage_V = time_s, current_A, voltage_V
        if stats.start_voltage_V is None:
            stats.start_voltage_V = voltage_V
        stats.duration_s = time_s


@dataclass
class StepLoop:
    """Runs one step's readings through the checks; returns why the step ended and what it did."""

    channel: str
    channel_limits: Limits
    driver: Potentiostat
    clock: Clock
    control: StepControl
    techniques: Techniques
    host: StepHost
    batch_size: int = 100
    batch_max_wall_s: float = 0.1

    def run(self, cmd: StepCommand, limits: Limits, run: RunContext) -> tuple[EndReason, StepStats]:
        stats = StepStats()
        batcher = Batcher(run, self.channel, self.host.publish_batch, self.batch_size, self.batch_max_wall_s)
        step_start_s = self.clock.now()
        step_start_run_s = step_start_s - run.start_cell_s
        # A step cut by a crash and run on counts the charge it passed before the crash: its capacity end and
        # its capacity limit are the whole step's, not this segment's.
        carried = run.carried.get(cmd.step_index)
        carried_Ah = carried.charge_Ah - carried.discharge_Ah if carried is not None else 0.0
        charge = ChargeCounter(run, stats, start_Ah=run.capacity_Ah - carried_Ah)
        reason: EndReason | None = None
        readings: Iterator[Reading] = iter(())
        stop_device: Callable[[], None] = _nothing_to_stop
        slope = VoltageSlope(DVDT_WINDOW_SAMPLES) if cmd.end.dvdt_V_per_h is not None else None
        slope_t: float | None = None  # active time of the last reading the slope took
        # A host-timed hold is read at an interval its dynamics choose (check_interval.py): faster than its
        # sample interval near a threshold, never slower. What is recorded stays the command's: its record
        # rule, else one reading per sample interval (plus the step's first and last, as always).
        planner = (
            CheckPlanner(
                cmd.step,
                cmd.end,
                (limits, self.channel_limits),
                cmd.sample_interval_s,
                min_read_interval_s(self.driver),
            )
            if cmd.step in HOST_TIMED_HOLDS and not self.techniques.device_runs(cmd.step)
            else None
        )
        rule = cmd.record
        if rule is None and planner is not None:
            rule = RecordRule(interval_s=cmd.sample_interval_s)
        last_rec: tuple[float, float, float] | None = None  # (step time, V, I) of the last recorded reading
        trip = TripDelay(limits.trip_delay_s)
        hard_trip = TripDelay(self.channel_limits.trip_delay_s)
        # Host-timed holds can pause at open circuit and go on; a device-run technique, a GITT or a sweep cannot.
        can_pause = (
            limits.action == "pause" and cmd.step in HOST_TIMED_HOLDS and not self.techniques.device_runs(cmd.step)
        )
        dvdt: float | None = None
        try:
            # Inside the try: configuring the source talks to the instrument too, and a dead link there
            # must end the step with its reason (and output off), not kill the agent's executor.
            readings, stop_device = self.techniques.readings(cmd, limits)
            paused_s = 0.0  # time spent paused does not count toward the step's time conditions and limit
            for reading in readings:
                step_t = reading.time_s if reading.time_s is not None else self.clock.now() - step_start_s
                paused_now = self.techniques.pausing
                if paused_now:
                    paused_s += step_t - charge.prev_time_s
                active_t = step_t - paused_s
                v, i, temp = reading.voltage_V, reading.current_A, reading.temperature_C
                # The channel's own limits are the lab's hard limits: they trip on their own terms (immediately
                # unless the lab file gives a delay) and always stop. A protocol's delay and pause apply to its own
                # limits. Charge of this step up to the previous sample (this one's share is added just below).
                step_q = charge.step_Ah
                hard = hard_trip.check(check_limits(self.channel_limits, v, i, temp, active_t, step_q), step_t)
                reason = hard or trip.check(check_limits(limits, v, i, temp, active_t, step_q), step_t)
                if (
                    reason is not None
                    and hard is None
                    and can_pause
                    and not paused_now
                    and reason.name not in IMMEDIATE
                ):
                    self._pause_on_limit(cmd, run, reason)
                    trip.reset()
                    reason = None
                if reason is not None:
                    self.host.safe_state()  # within this sample, before anything is published
                    stop_device()
                charge.add(step_t, v, i)
                t_run = run.last_time_s = step_start_run_s + step_t
                self.control.last_reading = reading
                if reason is None and not paused_now:
                    # dV/dt over the step's own sample interval: readings taken faster near a threshold would
                    # shrink the slope's window in time and read noise as a slope.
                    if slope is not None and (slope_t is None or active_t - slope_t >= cmd.sample_interval_s - 1e-9):
                        slope_t = active_t
                        dvdt = slope.add(active_t, v)
                    setpoint = cmd.current_A if cmd.current_A is not None else cmd.power_W
                    reason = check_end(cmd.step, cmd.end, setpoint, v, i, active_t, abs(charge.step_Ah), dvdt)
                if reason is None and not paused_now:
                    reason = self.control.end_requested(cmd.step_index)
                    if reason is not None:
                        stop_device()
                if reason is None and self.control.abort.is_set():
                    reason = EndReason(kind="aborted", name="abort", message="run aborted on request")
                    stop_device()
                # Every reading was checked above; the record keeps those its rule asks for, and a step's first
                # and last.
                if (
                    rule is None
                    or last_rec is None
                    or reason is not None
                    or paused_now  # a pause is always on the record: open circuit inside a current step
                    or rule.due(step_t - last_rec[0], v - last_rec[1], i - last_rec[2])
                ):
                    last_rec = (step_t, v, i)
                    stats.n_samples += 1
                    run.n_samples += 1
                    batcher.builder.add(t_run, v, i, run.capacity_Ah, temp, cmd.step_index, cmd.cycle, reading)
                if batcher.due(last_of_step=reason is not None):
                    batcher.flush(stats)
                    self.host.publish_step_status(cmd)
                if reason is not None:
                    break
                if planner is not None:
                    if paused_now:
                        planner.forget()  # open circuit: its readings say nothing of the source's dynamics
                    else:
                        due_in = rule.interval_s - (step_t - last_rec[0]) if rule is not None and last_rec else None
                        self.techniques.next_interval_s = planner.next_s(active_t, v, i, abs(charge.step_Ah), due_in)
            if reason is None:
                reason = EndReason(kind="end_condition", name="technique_complete")
        except Exception as exc:
            log.exception("channel %s: step %d failed", self.channel, cmd.step_index)
            reason = EndReason(kind="error", name=type(exc).__name__, message=str(exc))
            self.host.safe_state()
        finally:
            if reason is None or reason.kind != "end_condition":
                self.host.safe_state()
            elif cmd.step is not StepKind.rest:
                self.host.rest_between_steps()
            batcher.flush(stats)
            close = getattr(readings, "close", None)
            if close is not None:
                close()
        stats.end_voltage_V = charge.prev_voltage_V
        stats.end_current_A = charge.prev_current_A
        before = run.carried.pop(cmd.step_index, None)  # the step was cut by a crash and runs on: the whole step's
        return reason, (before.continued_by(stats) if before is not None else stats)

    def _pause_on_limit(self, cmd: StepCommand, run: RunContext, reason: EndReason) -> None:
        """action: pause. Open circuit within this sample; the step waits for `labtwin resume`. A limit still
        exceeded at open circuit is not something a pause can fix: the loop stops the step then."""
        self.driver.open_circuit()
        self.control.pause.set()
        log.warning("channel %s: %s tripped (%s): run %s paused", self.channel, reason.name, reason.value, run.run_id)
        self.host.publish_step_status(
            cmd,
            paused_message=f"paused by safety limit {reason.name}: {reason.value:.6g} beyond {reason.threshold:g}",
        )
