"""Safety limits and end conditions, checked by the agent on every sample.

Scalar comparisons on purpose: this runs once per sample in the agent's step
loop, next to the instrument, and must be obviously correct. The network is
never inside this loop.
"""

from __future__ import annotations

import math

from labtwin.documents import EndConditions, EndReason, Limits, StepKind


def check_limits(
    limits: Limits,
    voltage_V: float,
    current_A: float,
    temperature_C: float,
    step_time_s: float,
    step_capacity_Ah: float = 0.0,
) -> EndReason | None:
    """The first safety limit a sample violates, or None. NaN readings trip too:
    an instrument that returns garbage is not a safe instrument."""
    if math.isnan(voltage_V) or math.isnan(current_A):
        return EndReason(kind="safety_limit", name="invalid_reading", message="voltage or current is NaN")
    if limits.voltage_max_V is not None and voltage_V > limits.voltage_max_V:
        return EndReason(kind="safety_limit", name="voltage_max_V", value=voltage_V, threshold=limits.voltage_max_V)
    if limits.voltage_min_V is not None and voltage_V < limits.voltage_min_V:
        return EndReason(kind="safety_limit", name="voltage_min_V", value=voltage_V, threshold=limits.voltage_min_V)
    if limits.current_max_A is not None and abs(current_A) > limits.current_max_A:
        return EndReason(kind="safety_limit", name="current_max_A", value=current_A, threshold=limits.current_max_A)
    if not math.isnan(temperature_C):
        if limits.temperature_max_C is not None and temperature_C > limits.temperature_max_C:
            return EndReason(
                kind="safety_limit", name="temperature_max_C", value=temperature_C, threshold=limits.temperature_max_C
            )
        if limits.temperature_min_C is not None and temperature_C < limits.temperature_min_C:
            return EndReason(
                kind="safety_limit", name="temperature_min_C", value=temperature_C, threshold=limits.temperature_min_C
            )
    if limits.capacity_max_Ah is not None and abs(step_capacity_Ah) > limits.capacity_max_Ah:
        return EndReason(
            kind="safety_limit", name="capacity_max_Ah", value=abs(step_capacity_Ah), threshold=limits.capacity_max_Ah
        )
    if limits.step_time_max_s is not None and step_time_s >= limits.step_time_max_s:
        return EndReason(
            kind="safety_limit", name="step_time_max_s", value=step_time_s, threshold=limits.step_time_max_s
        )
    return None


def check_end(
    step: StepKind,
    end: EndConditions,
    setpoint_current_A: float | None,
    voltage_V: float,
    current_A: float,
    step_time_s: float,
    step_capacity_Ah: float,
    voltage_slope_V_per_h: float | None = None,
) -> EndReason | None:
    """The end condition a sample meets, or None (a normal end of the step). ``voltage_slope_V_per_h`` is
    the step's recent dV/dt (VoltageSlope), None until it has a full window."""
    if end.voltage_V is not None and step in (StepKind.cc, StepKind.cp) and setpoint_current_A is not None:
        charging = setpoint_current_A > 0
        if (charging and voltage_V >= end.voltage_V) or (not charging and voltage_V <= end.voltage_V):
            return EndReason(kind="end_condition", name="voltage_V", value=voltage_V, threshold=end.voltage_V)
    if end.current_A is not None and step in (StepKind.cv, StepKind.cccv) and abs(current_A) <= end.current_A:
        return EndReason(kind="end_condition", name="current_A", value=current_A, threshold=end.current_A)
    if end.capacity_Ah is not None and step_capacity_Ah >= end.capacity_Ah:
        return EndReason(kind="end_condition", name="capacity_Ah", value=step_capacity_Ah, threshold=end.capacity_Ah)
    if (
        end.dvdt_V_per_h is not None
        and voltage_slope_V_per_h is not None
        and abs(voltage_slope_V_per_h) < end.dvdt_V_per_h
    ):
        return EndReason(
            kind="end_condition", name="dvdt_V_per_h", value=voltage_slope_V_per_h, threshold=end.dvdt_V_per_h
        )
    if end.time_s is not None and step_time_s >= end.time_s - 1e-9:
        return EndReason(kind="end_condition", name="time_s", value=step_time_s, threshold=end.time_s)
    return None


class VoltageSlope:
    """dV/dt of a step from a least-squares line through its last ``window`` samples, in V/h.

    A line through the window rather than the difference of two samples: a 10 uV ADC step between two
    samples 10 s apart is already 3.6 mV/h, the order of the thresholds a relaxation criterion uses."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.t: list[float] = []
        self.v: list[float] = []

    def add(self, time_s: float, voltage_V: float) -> float | None:
        self.t.append(time_s)
        self.v.append(voltage_V)
        if len(self.t) > self.window:
            del self.t[0], self.v[0]
        if len(self.t) < self.window:
            return None
        t0 = self.t[0]
        ts = [t - t0 for t in self.t]
        n = len(ts)
        mean_t, mean_v = sum(ts) / n, sum(self.v) / n
        var = sum((t - mean_t) ** 2 for t in ts)
        if var <= 0:
            return None
        return 3600.0 * sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, self.v)) / var


IMMEDIATE = frozenset({"invalid_reading", "step_time_max_s", "capacity_max_Ah"})


class TripDelay:
    """A limit trips once it has been exceeded for ``delay_s`` of cell time without a sample back inside.

    BioLogic and Arbin schedules carry the same knob: a current spike when a source changes range, or one
    noisy voltage reading, should not end a month-long test. NaN readings and the step time trip at once."""

    def __init__(self, delay_s: float | None) -> None:
        self.delay_s = delay_s or 0.0
        self._since: dict[str, float] = {}

    def check(self, violation: EndReason | None, time_s: float) -> EndReason | None:
        if violation is None:
            self._since.clear()
            return None
        if self.delay_s <= 0 or violation.name in IMMEDIATE:
            return violation
        since = self._since.setdefault(violation.name, time_s)
        for name in [n for n in self._since if n != violation.name]:
            del self._since[name]
        if time_s - since >= self.delay_s - 1e-9:
            return violation.model_copy(
                update={"message": f"exceeded for {time_s - since:g} s (trip delay {self.delay_s:g} s)"}
            )
        return None

    def reset(self) -> None:
        self._since.clear()
