"""Safety limits and end conditions, checked by the agent on every sample.

Scalar comparisons on purpose: this runs once per sample in the agent's step
loop, next to the instrument, and must be obviously correct. The network is
never inside this loop.
"""

from __future__ import annotations

import math

from labtwin.models import EndConditions, EndReason, Limits, StepKind


def check_limits(
    limits: Limits, voltage_V: float, current_A: float, temperature_C: float, step_time_s: float
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
) -> EndReason | None:
    """The end condition a sample meets, or None (a normal end of the step)."""
    if end.voltage_V is not None and step is StepKind.cc and setpoint_current_A is not None:
        charging = setpoint_current_A > 0
        if (charging and voltage_V >= end.voltage_V) or (not charging and voltage_V <= end.voltage_V):
            return EndReason(kind="end_condition", name="voltage_V", value=voltage_V, threshold=end.voltage_V)
    if end.current_A is not None and step in (StepKind.cv, StepKind.cccv) and abs(current_A) <= end.current_A:
        return EndReason(kind="end_condition", name="current_A", value=current_A, threshold=end.current_A)
    if end.capacity_Ah is not None and step_capacity_Ah >= end.capacity_Ah:
        return EndReason(kind="end_condition", name="capacity_Ah", value=step_capacity_Ah, threshold=end.capacity_Ah)
    if end.time_s is not None and step_time_s >= end.time_s - 1e-9:
        return EndReason(kind="end_condition", name="time_s", value=step_time_s, threshold=end.time_s)
    return None
