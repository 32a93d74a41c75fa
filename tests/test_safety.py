"""Safety limits and end conditions as the agent evaluates them on every sample."""

import math

from labtwin.agent.safety import check_end, check_limits
from labtwin.documents import EndConditions, Limits, StepKind

LIM = Limits(voltage_min_V=1.0, voltage_max_V=3.0, current_max_A=0.01, temperature_max_C=45, step_time_max_s=100)


def test_within_limits_is_silent():
    assert check_limits(LIM, 2.0, 0.005, 25.0, 10.0) is None


def test_each_limit_trips_by_name():
    assert check_limits(LIM, 3.01, 0, 25, 1).name == "voltage_max_V"
    assert check_limits(LIM, 0.99, 0, 25, 1).name == "voltage_min_V"
    assert check_limits(LIM, 2.0, -0.02, 25, 1).name == "current_max_A"
    assert check_limits(LIM, 2.0, 0, 46, 1).name == "temperature_max_C"
    assert check_limits(LIM, 2.0, 0, 25, 100).name == "step_time_max_s"
    assert check_limits(Limits(capacity_max_Ah=1e-3), 2.0, 0, 25, 1, -1.1e-3).name == "capacity_max_Ah"
    assert check_limits(Limits(capacity_max_Ah=1e-3), 2.0, 0, 25, 1, 0.9e-3) is None


def test_nan_reading_trips_but_missing_temperature_does_not():
    assert check_limits(LIM, math.nan, 0, 25, 1).name == "invalid_reading"
    assert check_limits(LIM, 2.0, 0, math.nan, 1) is None


def test_cc_voltage_end_follows_the_current_direction():
    end = EndConditions(voltage_V=2.5)
    assert check_end(StepKind.cc, end, 0.001, 2.6, 0.001, 1, 0) is not None  # charging reaches it from below
    assert check_end(StepKind.cc, end, -0.001, 2.6, -0.001, 1, 0) is None  # discharging from above: not yet
    assert check_end(StepKind.cc, end, -0.001, 2.4, -0.001, 1, 0) is not None


def test_cv_ends_when_current_decays():
    end = EndConditions(current_A=1e-4, time_s=3600)
    assert check_end(StepKind.cv, end, None, 2.5, 2e-4, 1, 0) is None
    assert check_end(StepKind.cv, end, None, 2.5, 0.9e-4, 1, 0).name == "current_A"


def test_a_trip_delay_needs_the_limit_exceeded_for_the_whole_delay():
    from labtwin.agent.safety import TripDelay
    from labtwin.documents import EndReason

    delay = TripDelay(30)
    over = EndReason(kind="safety_limit", name="voltage_max_V", value=3.1, threshold=3.0)
    assert delay.check(over, 0) is None and delay.check(over, 20) is None
    assert delay.check(None, 25) is None  # back inside the limit: the clock starts again
    assert delay.check(over, 30) is None and delay.check(over, 59) is None
    assert delay.check(over, 60).name == "voltage_max_V"
    assert TripDelay(30).check(EndReason(kind="safety_limit", name="invalid_reading"), 0) is not None  # at once
