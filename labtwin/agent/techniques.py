"""The readings of one step: host-timed techniques generated here, or a technique the device runs itself.

Host-timed (the agent sets the source and reads it every sample interval, sooner near a threshold: the
sample loop's check planner sets ``next_interval_s``): rest, cc, cv, cccv, cp,
GITT pulses and relaxations, and cyclic-voltammetry staircases. A driver that runs a technique on the
instrument (RunsTechniques, e.g. an EmStat's MethodSCRIPT) streams its own readings instead. Either
way the sample loop sees one iterator of readings and checks every one of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

from labtwin.agent.control import StepControl
from labtwin.devices.clock import Clock
from labtwin.devices.potentiostat import Potentiostat, Reading, RunsTechniques
from labtwin.documents import Limits, StepCommand, StepKind

HOST_TIMED_HOLDS = (StepKind.rest, StepKind.cc, StepKind.cv, StepKind.cccv, StepKind.cp)
"""Steps that hold one source setting: they can pause at open circuit and go on with it re-applied."""

MAX_SPEED_PAUSE_WALL_S = 0.02
"""At max speed a pause must not spin out rest samples as fast as the CPU allows."""


COMPLIANCE_MARGIN = 0.02
"""How far beyond the checked voltage limit a current source's own voltage limit sits (relative, at least 2 mV)."""

NO_LIMIT = 1e3
"""The compliance when the channel sets no limit of that kind (V or A): the instrument's own range then bounds it."""


def compliance_V(limits: Limits, current_A: float) -> float:
    """A current source's own voltage limit: the backstop, COMPLIANCE_MARGIN beyond the limit the agent checks.

    Decided (issue 14): the channel's limit is the check and the compliance the backstop. The agent trips on
    the first sample beyond the limit and records why (voltage_max_V, the value, the run failed); were the
    compliance at the limit itself, the source would regulate there and the cell would sit at the limit with
    a tapering current and no trip. ``limits`` is the channel's tightened by the step's own, so the backstop
    is never more than the margin beyond the channel's envelope, and a dead agent leaves the instrument
    bounded there: within 2 % of the channel's voltage limit in the direction the current drives the cell.
    Every setpoint was admitted inside the envelope before (admission.py): a cccv's setpoint, the voltage
    limit of its CC phase, is inside the window. A voltage source's current limit is current_max_A itself,
    no margin (``current_limit_A`` in Techniques.readings)."""
    v = limits.voltage_max_V if current_A > 0 else limits.voltage_min_V
    if v is None:
        return math.copysign(NO_LIMIT, current_A)
    return v + math.copysign(COMPLIANCE_MARGIN * max(abs(v), 0.1), current_A)


def clamp_at_end_voltage(compliance: float, current_A: float, end_voltage_V: float | None) -> float:
    """The source's voltage limit at the step's end voltage when it has one (as a cycler's CC step does):
    a cell whose voltage jumps within a sample (an emptied host) is clamped there and ends the step,
    instead of running on to the safety limit."""
    if end_voltage_V is None:
        return compliance
    return min(compliance, end_voltage_V) if current_A > 0 else max(compliance, end_voltage_V)


class Techniques:
    """Makes the readings of a step on one channel's driver and clock."""

    def __init__(
        self, driver: Potentiostat, clock: Clock, control: StepControl, channel: str, driver_name: str = ""
    ) -> None:
        self.driver = driver
        self.clock = clock
        self.control = control
        self.channel = channel
        self.driver_name = driver_name
        self.pausing = False  # the reading just yielded was taken while paused (read by the sample loop)
        # The wait before the next reading of a hold, set by the sample loop after each reading from its check
        # planner (check_interval.py); None: the command's sample interval.
        self.next_interval_s: float | None = None

    def device_runs(self, step: StepKind) -> bool:
        return isinstance(self.driver, RunsTechniques) and self.driver.supports(step)

    def readings(self, cmd: StepCommand, limits: Limits) -> tuple[Iterator[Reading], Callable[[], None]]:
        """The readings of a step, host-timed or device-run, and how to stop it early."""
        driver = self.driver
        # A step aborted while paused leaves its generator suspended inside the pause (it never clears the
        # flag): without this the next step would count all its time as paused and never end on time.
        self.pausing = False
        self.next_interval_s = None
        if isinstance(driver, RunsTechniques) and driver.supports(cmd.step):
            return driver.run_technique(cmd), driver.abort
        current_limit_A = limits.current_max_A if limits.current_max_A else NO_LIMIT
        if cmd.step in HOST_TIMED_HOLDS:
            self._apply_setting(cmd, limits, current_limit_A)
            return self._every_interval(cmd, limits, current_limit_A), lambda: None
        if cmd.step is StepKind.gitt:
            assert cmd.current_A is not None  # StepCommand validates it
            return self._gitt(cmd, compliance_V(limits, cmd.current_A)), lambda: None
        if cmd.step is StepKind.cyclic_voltammetry:
            return self._sweep(cmd, current_limit_A), lambda: None
        if cmd.step is StepKind.eis:
            raise ValueError(
                f"channel {self.channel}: driver {self.driver_name or type(driver).__name__} cannot run impedance "
                "(EIS needs a frequency response analyser: a device-run technique)"
            )
        raise ValueError(f"unsupported step {cmd.step}")  # pragma: no cover - StepKind is closed

    # ------------------------------------------------------------------ holds: rest, cc, cv, cccv, cp

    def _apply_setting(self, cmd: StepCommand, limits: Limits, current_limit_A: float) -> None:
        """The source setting of a host-timed step (again after a pause)."""
        driver = self.driver
        if cmd.step is StepKind.rest:
            driver.open_circuit()
        elif cmd.step is StepKind.cp:
            assert cmd.power_W is not None
            last = self.control.last_reading
            v = last.voltage_V if last is not None else driver.read().voltage_V
            # Constant power as the current P / V at the last measured voltage (a floor of 10 mV keeps it
            # finite), held within the step's current limit: re-set every sample, as a host-timed cycler does.
            current = cmd.power_W / max(abs(v), 0.01)
            current = math.copysign(min(abs(current), current_limit_A), current)
            driver.set_current(current, clamp_at_end_voltage(compliance_V(limits, current), current, cmd.end.voltage_V))
        elif cmd.step is StepKind.cc:
            assert cmd.current_A is not None
            compliance = clamp_at_end_voltage(compliance_V(limits, cmd.current_A), cmd.current_A, cmd.end.voltage_V)
            driver.set_current(cmd.current_A, compliance)
        elif cmd.step is StepKind.cv:
            assert cmd.voltage_V is not None
            driver.set_voltage(cmd.voltage_V, current_limit_A)
        elif cmd.step is StepKind.cccv:
            # An SMU in current mode with its voltage limit at the CV setpoint IS a CCCV source:
            # it regulates at the limit once the cell gets there, and the current tapers.
            assert cmd.current_A is not None and cmd.voltage_V is not None
            driver.set_current(cmd.current_A, cmd.voltage_V)

    def _every_interval(self, cmd: StepCommand, limits: Limits, current_limit_A: float) -> Iterator[Reading]:
        driver, clock, control = self.driver, self.clock, self.control
        while True:
            if control.pause.is_set() and not control.abort.is_set():
                # Paused: open circuit within this sample, keep sampling (limits still checked), re-apply on resume.
                driver.open_circuit()
                while control.pause.is_set() and not control.abort.is_set():
                    clock.sleep(cmd.sample_interval_s)
                    if clock.speed is None:
                        time.sleep(MAX_SPEED_PAUSE_WALL_S)
                    self.pausing = True
                    yield driver.read()
                self.pausing = False
                self.next_interval_s = None  # the dynamics before the pause say nothing about after it
                if control.abort.is_set():
                    return
                self._apply_setting(cmd, limits, current_limit_A)
            wait = self.next_interval_s
            clock.sleep(wait if wait is not None else cmd.sample_interval_s)
            reading = driver.read()
            yield reading
            if cmd.step is StepKind.cp and not control.pause.is_set():
                control.last_reading = reading
                self._apply_setting(cmd, limits, current_limit_A)

    # ------------------------------------------------------------------ gitt, sweeps

    def _gitt(self, cmd: StepCommand, compliance: float) -> Iterator[Reading]:
        """Pulses and relaxations on a host-timed source, until a pulse reaches the cut-off voltage.

        The pulse that reaches the cut-off ends there (the source's voltage limit sits at the cut-off,
        as in a cc step with an end voltage, and the pulse stops at the first sample beyond it) and is
        still followed by its relaxation, so the last relaxed voltage is measured too. Running the
        last pulse to its full length would drive the cell into the safety limit instead."""
        g, driver, clock = cmd.gitt, self.driver, self.clock
        assert g is not None and cmd.current_A is not None
        current_A = cmd.current_A
        cutoff = cmd.end.voltage_V
        compliance = clamp_at_end_voltage(compliance, current_A, cutoff)

        def beyond(reading: Reading) -> bool:
            return cutoff is not None and (
                (current_A > 0 and reading.voltage_V >= cutoff - 1e-6)
                or (current_A < 0 and reading.voltage_V <= cutoff + 1e-6)
            )

        for _ in range(g.max_pulses):
            driver.set_current(current_A, compliance)
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
        assert sweep is not None
        dwell = sweep.step_V / sweep.scan_rate_V_s
        for potential in sweep.potentials_V():
            driver.set_voltage(potential, current_limit_A)
            clock.sleep(dwell)
            yield driver.read()
