"""How long the agent waits before it next reads a host-timed step: short near a cut-off or a limit.

The record interval says which readings are kept; it must not say how often the cell is looked at. Issue 14
measured it: a 1C LTO discharge to 1.0 V read every 5 s (its record interval) on a Keithley 2450 ran
1.452 -> 1.178 -> -1.432 V between two readings and tripped voltage_min_V, where a cycler ends the step at
its cut-off. Here the agent picks the time to its next reading from the step's dynamics: dV/dt (and d|I|/dt,
and the charge rate) from its last two readings, and the distance to every threshold the step can meet next
(its end conditions, the step's and the channel's limits). The next reading comes before the cell has moved
a quarter of the way there (``FRACTION``), but after at least ``TOLERANCE_V`` of motion (or the relative
current and charge tolerance): a linear prediction then overshoots by at most the tolerance, and the
approach does not creep up a quarter at a time for ever. Far from any threshold the step reads at its own
sample interval (at most the channel's sample_interval_max_s, which admission.py enforces); near one it
reads as fast as the driver allows (``min_read_interval_s`` of the driver, DEFAULT_MIN_READ_INTERVAL_S if it
says nothing). Time thresholds (an end ``time_s``, ``step_time_max_s``, the next record) are met exactly.

Scalar arithmetic, a handful of comparisons per reading: this runs in the safety loop, once per reading.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from labtwin.documents import EndConditions, Limits, StepKind

FRACTION = 0.25
"""The next reading comes before the cell has covered this fraction of its distance to the nearest threshold."""

TOLERANCE_V = 1e-3
"""Within this of a voltage threshold the next reading is planned at the predicted crossing: the overshoot a
linear prediction allows. A cut-off met within a few mV is what a cycler does."""

TOLERANCE_RELATIVE = 0.01
"""The same for a current (an end current, current_max_A) or a charge threshold, relative to the threshold."""

DEFAULT_MIN_READ_INTERVAL_S = 0.1
"""The shortest interval between two readings of a driver that does not say its own (``min_read_interval_s``)."""

MAX_GROWTH = 10.0
"""The most a voltage rate is taken to grow over the next wait (see CheckPlanner)."""

SHORTEST_WAIT_S = 1e-6
"""A wait for a time threshold is never zero: the clock must move for the next reading to be a new one."""


def min_read_interval_s(driver: object) -> float:
    """The shortest time between two readings the driver's instrument gives (a property of each driver)."""
    value = getattr(driver, "min_read_interval_s", None)
    return float(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_MIN_READ_INTERVAL_S


def approach_s(
    value: float, rate_per_s: float, threshold: float, tolerance: float, min_s: float = 0.0, growth: float = 1.0
) -> float:
    """The wait before the next reading for one threshold: ``inf`` if ``value`` does not move toward it.

    Moving toward it at ``rate_per_s`` (taken ``growth`` times faster, a knee that steepens), the wait
    covers FRACTION of the distance, but at least ``tolerance`` of it: the predicted overshoot is at most the
    tolerance, and the approach ends in a few readings instead of creeping up on the threshold a quarter at a
    time. When that is sooner than the instrument can read (``min_s``), readings at ``min_s`` would each move
    the value by more than the tolerance, and the one past the threshold could be a whole such step beyond
    it: the wait is then ``min_s`` while two of them still fall short, and the crossing predicted at the
    measured rate (plus the tolerance) once they would not."""
    gap = threshold - value
    if rate_per_s == 0.0 or gap * rate_per_s <= 0.0:
        return math.inf
    rate, gap = abs(rate_per_s), abs(gap)
    wait = max(FRACTION * gap, tolerance) / (rate * growth)
    if wait >= min_s:
        return wait
    crossing = (gap + tolerance) / rate
    return crossing if min_s <= crossing < 2.0 * min_s else min_s


def check_interval_s(
    approaches: Iterable[tuple[float, float, float, float, float]],
    time_left_s: Iterable[float],
    min_s: float,
    max_s: float,
) -> float:
    """The time to the next reading.

    ``approaches``: (value, rate per s, threshold, tolerance, growth) for every threshold a quantity can meet
    (see ``approach_s``); the shortest wait wins, floored at ``min_s`` (the instrument cannot read faster) and
    capped at ``max_s`` (the step's sample interval). ``time_left_s``: thresholds in time (an end time_s,
    step_time_max_s, the next record), met exactly: the wait never goes past one, floor or not."""
    wait = max_s
    for value, rate, threshold, tolerance, growth in approaches:
        wait = min(wait, approach_s(value, rate, threshold, tolerance, min_s, growth))
    wait = min(max(wait, min_s), max_s)
    for left in time_left_s:
        wait = min(wait, max(left, SHORTEST_WAIT_S))
    return wait


class CheckPlanner:
    """One step's check interval: the thresholds it can meet, fixed at its start, and its last reading.

    ``next_s`` takes each reading (step time, V, I, the step's charge so far) and returns the wait before
    the next one. Rates are the difference of the last two readings: the freshest slope, so a knee that
    steepens is seen at the reading after it starts."""

    def __init__(
        self,
        step: StepKind,
        end: EndConditions,
        limits: Iterable[Limits],
        sample_interval_s: float,
        min_s: float,
    ) -> None:
        self.max_s = sample_interval_s
        self.min_s = min(min_s, sample_interval_s)
        v: list[float] = []
        i: list[float] = []
        q: list[float] = []
        t: list[float] = []
        for lim in limits:
            v += [x for x in (lim.voltage_min_V, lim.voltage_max_V) if x is not None]
            i += [lim.current_max_A] if lim.current_max_A is not None else []
            q += [lim.capacity_max_Ah] if lim.capacity_max_Ah is not None else []
            t += [lim.step_time_max_s] if lim.step_time_max_s is not None else []
        if end.voltage_V is not None and step in (StepKind.cc, StepKind.cp):
            v.append(end.voltage_V)
        if end.current_A is not None and step in (StepKind.cv, StepKind.cccv):
            i.append(end.current_A)
        if end.capacity_Ah is not None:
            q.append(end.capacity_Ah)
        if end.time_s is not None:
            t.append(end.time_s)
        self.voltages_V = tuple(v)
        self.currents_A = tuple(i)
        self.charges_Ah = tuple(q)
        self.times_s = tuple(t)
        self._last: tuple[float, float, float, float] | None = None
        self._dv: float | None = None  # dV/dt over the last interval

    def next_s(
        self, time_s: float, voltage_V: float, current_A: float, charge_Ah: float, record_in_s: float | None = None
    ) -> float:
        """The wait before the next reading, after this one. ``charge_Ah`` is the step's charge magnitude;
        ``record_in_s`` the time until the record rule's next interval is due (None: no such time)."""
        times = [limit - time_s for limit in self.times_s]
        if record_in_s is not None:
            times.append(record_in_s)
        last, self._last = self._last, (time_s, voltage_V, current_A, charge_Ah)
        if last is None or not (math.isfinite(voltage_V) and math.isfinite(current_A)):
            return check_interval_s((), times, self.min_s, self.max_s)
        dt = time_s - last[0]
        if dt <= 0:
            return check_interval_s((), times, self.min_s, self.max_s)
        dv = (voltage_V - last[1]) / dt
        di = (abs(current_A) - abs(last[2])) / dt
        dq = abs(current_A) / 3600.0
        # A knee steepens: a rate that grew by a factor over the last interval is taken to grow as much again
        # over the next, for the quarter rule (the predicted crossing is the measured rate's).
        prev_dv, self._dv = self._dv, dv
        growth = 1.0
        if prev_dv is not None and dv * prev_dv > 0 and abs(dv) > abs(prev_dv):
            growth = min(abs(dv / prev_dv), MAX_GROWTH)
        approaches = []
        # Of the thresholds a quantity moves toward, the nearest is met first: the step ends or trips there, and
        # one farther on must not ask for readings at the floor that would overshoot the nearest.
        for value, rate, thresholds, tolerance, grow in (
            (voltage_V, dv, self.voltages_V, TOLERANCE_V, growth),
            (abs(current_A), di, self.currents_A, None, 1.0),
            (charge_Ah, dq, self.charges_Ah, None, 1.0),
        ):
            ahead = [x for x in thresholds if (x - value) * rate > 0]
            if ahead:
                x = min(ahead, key=lambda x: abs(x - value))
                approaches.append(
                    (value, rate, x, tolerance if tolerance is not None else TOLERANCE_RELATIVE * x, grow)
                )
        return check_interval_s(approaches, times, self.min_s, self.max_s)

    def forget(self) -> None:
        """Drop the last reading (a pause at open circuit): the next rate is taken from fresh readings."""
        self._last = None
        self._dv = None
