"""The check interval: how long the agent waits before its next reading, from the step's dynamics (issue 14)."""

import math

import numpy as np
import pytest

from labtwin.agent.check_interval import (
    FRACTION,
    TOLERANCE_V,
    CheckPlanner,
    approach_s,
    check_interval_s,
    min_read_interval_s,
)
from labtwin.devices.clock import VirtualClock
from labtwin.documents import EndConditions, Limits, StepKind
from labtwin.physics.library import load_cell
from labtwin.simulators.potentiostat import SimulatedPotentiostat


def test_a_threshold_moved_away_from_or_not_moved_toward_sets_no_wait():
    assert approach_s(1.5, +0.01, 1.0, TOLERANCE_V) == math.inf  # rising, the cut-off is below
    assert approach_s(1.5, 0.0, 1.0, TOLERANCE_V) == math.inf
    assert approach_s(0.9, -0.01, 1.0, TOLERANCE_V) == math.inf  # already beyond and going on: the check trips


def test_the_wait_covers_a_quarter_of_the_distance_but_at_least_the_tolerance():
    # 0.5 V above the cut-off, falling 10 mV/s: a quarter of the way is 12.5 s
    assert approach_s(1.5, -0.01, 1.0, TOLERANCE_V) == pytest.approx(FRACTION * 0.5 / 0.01)
    # 2 mV above: a quarter would be 0.5 mV, the tolerance (1 mV) is the least motion between two readings
    assert approach_s(1.002, -0.01, 1.0, TOLERANCE_V) == pytest.approx(TOLERANCE_V / 0.01)
    # 0.5 mV above: the next reading is predicted 0.5 mV beyond, within the tolerance
    assert approach_s(1.0005, -0.01, 1.0, TOLERANCE_V) == pytest.approx(TOLERANCE_V / 0.01)


def test_the_wait_is_floored_at_the_fastest_reading_capped_at_the_interval_and_meets_times_exactly():
    near = [(1.0001, -1.0, 1.0, TOLERANCE_V, 1.0)]  # 1 V/s: 1 ms to the next millivolt
    assert check_interval_s(near, (), min_s=0.05, max_s=5.0) == 0.05
    far = [(3.0, -1e-5, 1.0, TOLERANCE_V, 1.0)]
    assert check_interval_s(far, (), min_s=0.05, max_s=5.0) == 5.0
    assert check_interval_s(far, (2.5,), min_s=0.05, max_s=5.0) == 2.5  # the step's end time, or the next record
    assert check_interval_s(near, (0.01,), min_s=0.05, max_s=5.0) == 0.01  # a time is met even below the floor
    assert check_interval_s((), (0.0,), min_s=0.05, max_s=5.0) > 0  # the clock always moves


def test_a_driver_says_its_fastest_reading_and_a_driver_that_does_not_gets_the_default():
    from labtwin.instruments.keithley2450 import Keithley2450

    assert min_read_interval_s(Keithley2450) == Keithley2450.min_read_interval_s
    assert min_read_interval_s(object()) == pytest.approx(0.1)


def _knee_V(t_s: float) -> float:
    """A discharge plateau at 1.55 V whose end collapses like a depleted host: 1.55 - 1/(T - t) V, T = 3600 s,
    -2 V past it. From 1.45 V to 1.0 V in 8 s, 0.3 V/s at the cut-off: read every 5 s, the reading after
    1.35 V is -2 V (the 1.178 -> -1.432 V of issue 14)."""
    left = 3600.0 - t_s
    return 1.55 - 1.0 / left if left > 1.0 / 3.55 else -2.0


def _run(planner: CheckPlanner | None, interval_s: float, voltage, end_V: float = 1.0) -> tuple[float, int]:
    """Read ``voltage(t)`` at the planner's waits (every ``interval_s`` without one) until the cut-off: the
    voltage of the reading that ends the step and the number of readings."""
    t, n, wait = 0.0, 0, interval_s
    while True:
        t += wait
        v = voltage(t)
        n += 1
        if v <= end_V:
            return v, n
        if planner is not None:
            wait = planner.next_s(t, v, -1e-5, 0.0)


def test_a_planned_discharge_meets_a_steep_knee_within_a_few_mV_where_reading_at_the_record_interval_does_not():
    def planner():
        return CheckPlanner(StepKind.cc, EndConditions(voltage_V=1.0), [Limits(voltage_min_V=0.8)], 5.0, min_s=1e-4)

    fixed_V, fixed_n = _run(None, 5.0, _knee_V)
    planned_V, planned_n = _run(planner(), 5.0, _knee_V)
    assert fixed_V < 0.8  # the record interval's reading is past the safety limit: the bench's trip
    assert 1.0 - planned_V < 0.01, planned_V  # the cut-off, met within 10 mV
    assert planned_n < fixed_n + 100  # a few dozen readings more, near the end only


def test_far_from_every_threshold_the_step_reads_at_its_interval():
    p = CheckPlanner(StepKind.cc, EndConditions(voltage_V=1.0, time_s=3600), [Limits(voltage_min_V=0.5)], 5.0, 0.05)
    assert p.next_s(5.0, 1.55, -1e-5, 0.0) == 5.0  # the first reading: no rate yet
    assert p.next_s(10.0, 1.5499, -1e-5, 0.0) == 5.0  # 20 uV/s, 0.55 V to go
    assert p.next_s(3598.0, 1.5498, -1e-5, 0.0) == pytest.approx(2.0)  # the end time comes first


def test_a_cv_hold_reads_faster_as_its_current_decays_onto_the_end_current():
    tau_s, i0, i_end = 600.0, 1e-3, 5e-5
    p = CheckPlanner(StepKind.cv, EndConditions(current_A=i_end), [Limits(current_max_A=2e-3)], 10.0, 0.05)
    t, i, waits = 0.0, i0, []
    while i > i_end:
        wait = p.next_s(t, 2.5, i, 0.0)
        waits.append(wait)
        t += wait
        i = i0 * math.exp(-t / tau_s)
    assert (i_end - i) / i_end < 0.01  # met within 1 % of the end current
    assert min(waits) < 10.0 and waits[1] == 10.0  # far off it reads at its interval, near it sooner


def test_the_charge_a_step_has_passed_counts_as_a_threshold():
    p = CheckPlanner(StepKind.cc, EndConditions(capacity_Ah=1e-5), [], 60.0, 0.05)
    p.next_s(0.0, 1.55, -3.6e-5, 0.0)
    # 1e-8 Ah per second at 36 uA; 1e-6 Ah to go: a quarter is 25 s
    assert p.next_s(60.0, 1.55, -3.6e-5, 1e-5 - 1e-6) == pytest.approx(25.0)


def test_the_lto_films_subsecond_knee_is_met_within_10_mV_when_checks_may_come_every_200_ms():
    """The many-particle LTO film (the cell of issue 14's probe) on the simulated potentiostat with the 2450's
    compliance: once the host is full its voltage falls at I / C_dl, 1.4 V/s, below 1.0 V half a second after
    leaving 1.3 V. Read at the fixed 0.2 s a channel's sample_interval_max_s of 0.2 s allows, the reading past
    the cut-off is tens of mV beyond it; with the planner it lands within a few mV (the driver's 50 ms
    floor, then the predicted crossing)."""
    cell = load_cell("lto-thin-film")
    results: dict[bool, list[tuple[float, int]]] = {False: [], True: []}
    for planned in (False, True):
        for phase_s in (0.0, 0.05, 0.1, 0.15):  # where the knee falls between two fixed readings
            clock = VirtualClock()
            sp = SimulatedPotentiostat(cell, clock, np.random.default_rng(0), voltage_limit_kind="magnitude")
            sp.set_current(-cell.nominal_capacity_Ah, 1.0)
            clock.sleep(3500.0 + phase_s)  # the plateau, unread: no threshold is near
            sp.read()
            p = CheckPlanner(StepKind.cc, EndConditions(voltage_V=1.0), [Limits(voltage_min_V=0.8)], 0.2, 0.05)
            wait, n = 0.2, 0
            while True:
                clock.sleep(wait)
                r = sp.read()
                n += 1
                if r.voltage_V <= 1.0 or clock.now() > 2 * 3600:
                    break
                if planned:
                    wait = p.next_s(clock.now(), r.voltage_V, r.current_A, 0.0)
            results[planned].append((r.voltage_V, n))
    assert max(1.0 - v for v, _ in results[False]) > 0.030, results  # up to 0.27 V (0.2 s at 1.4 V/s)
    assert max(1.0 - v for v, _ in results[True]) < 0.010, results
    assert max(n for _, n in results[True]) < max(n for _, n in results[False]) + 20, results
