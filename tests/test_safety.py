"""Safety limits and end conditions as the agent evaluates them on every sample."""

import math

from labtwin.models import EndConditions, Limits, StepKind
from labtwin.safety import check_end, check_limits

LIM = Limits(voltage_min_V=1.0, voltage_max_V=3.0, current_max_A=0.01, temperature_max_C=45, step_time_max_s=100)


def test_within_limits_is_silent():
    assert check_limits(LIM, 2.0, 0.005, 25.0, 10.0) is None


def test_each_limit_trips_by_name():
    assert check_limits(LIM, 3.01, 0, 25, 1).name == "voltage_max_V"
    assert check_limits(LIM, 0.99, 0, 25, 1).name == "voltage_min_V"
    assert check_limits(LIM, 2.0, -0.02, 25, 1).name == "current_max_A"
    assert check_limits(LIM, 2.0, 0, 46, 1).name == "temperature_max_C"
    assert check_limits(LIM, 2.0, 0, 25, 100).name == "step_time_max_s"


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
