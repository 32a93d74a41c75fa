"""Safety limits: what the agent enforces on every sample, and how limits combine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar

from pydantic import ConfigDict, Field, model_validator

from labtwin.documents.base import Finite

_T = TypeVar("_T")

DEFAULT_SAMPLE_INTERVAL_MAX_S = 10.0
"""The longest time between two readings (and so between two safety checks) of a step when neither the channel
nor the step sets ``sample_interval_max_s``. Ten seconds at 1C moves the state of charge by 0.3 %: a cut-off or
a limit is met within a few mV. The issue-14 probe read a cell every 600 s and pushed 69 % of its capacity in
before the first check (4.745 V on a 3.8 V channel)."""


class Limits(Finite):
    """Safety limits the agent enforces on every sample, next to the instrument.

    A limit that trips ends the step within that sample and puts the
    instrument in a safe state; the run is then stopped. ``None`` means "no
    limit of this kind" at this level (a channel or protocol may still set it).
    """

    model_config = ConfigDict(extra="forbid")

    voltage_min_V: float | None = None
    voltage_max_V: float | None = None
    current_max_A: float | None = Field(None, gt=0, description="magnitude, either sign")
    temperature_min_C: float | None = None
    temperature_max_C: float | None = None
    step_time_max_s: float | None = Field(None, gt=0)
    capacity_max_Ah: float | None = Field(
        None,
        gt=0,
        description="charge passed in one step (either sign): the backstop when a voltage end condition "
        "is never met (a soft short charging forever)",
    )
    trip_delay_s: float | None = Field(
        None,
        ge=0,
        description="a voltage, current or temperature limit trips only once exceeded this long (cell "
        "time, every sample in between over it): rides through a one-sample spike; NaN readings and the step "
        "time limit trip at once",
    )
    sample_interval_max_s: float | None = Field(
        None,
        gt=0,
        description="the longest sample interval a step may ask for on this channel: the agent reads and checks "
        "the cell at least this often, and refuses a step that asks for less (None: "
        f"{DEFAULT_SAMPLE_INTERVAL_MAX_S:g} s; record less often with record: {{interval_s, poll_interval_s}})",
    )
    action: Literal["stop", "safe_state", "pause"] | None = Field(
        None,
        description="on a trip: stop (default) or safe_state, both output off and the run ends failed; pause: "
        "open circuit and the run waits for `labtwin resume` (a limit still exceeded at open circuit stops it)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Limits:
        if (
            self.voltage_min_V is not None
            and self.voltage_max_V is not None
            and self.voltage_min_V >= self.voltage_max_V
        ):
            raise ValueError(f"voltage_min_V ({self.voltage_min_V}) must be below voltage_max_V ({self.voltage_max_V})")
        if (
            self.temperature_min_C is not None
            and self.temperature_max_C is not None
            and self.temperature_min_C >= self.temperature_max_C
        ):
            raise ValueError("temperature_min_C must be below temperature_max_C")
        return self

    def tighten(self, other: Limits | None) -> Limits:
        """The tighter of two limit sets, field by field (channel vs protocol)."""
        if other is None:
            return self

        def pick(a: _T | None, b: _T | None, tighter: Callable[[_T, _T], _T]) -> _T | None:
            if a is None:
                return b
            if b is None:
                return a
            return tighter(a, b)

        return Limits(
            voltage_min_V=pick(self.voltage_min_V, other.voltage_min_V, max),
            voltage_max_V=pick(self.voltage_max_V, other.voltage_max_V, min),
            current_max_A=pick(self.current_max_A, other.current_max_A, min),
            temperature_min_C=pick(self.temperature_min_C, other.temperature_min_C, max),
            temperature_max_C=pick(self.temperature_max_C, other.temperature_max_C, min),
            step_time_max_s=pick(self.step_time_max_s, other.step_time_max_s, min),
            capacity_max_Ah=pick(self.capacity_max_Ah, other.capacity_max_Ah, min),
            trip_delay_s=pick(self.trip_delay_s, other.trip_delay_s, min),
            sample_interval_max_s=pick(self.sample_interval_max_s, other.sample_interval_max_s, min),
            # The safer action wins: a channel that stops on a trip is not paused by a protocol.
            action=pick(self.action, other.action, lambda a, b: a if a != "pause" else b),
        )

    def violations_of(self, other: Limits) -> list[str]:
        """What ``other`` asks for beyond these limits (empty if nothing). A limit ``other``
        leaves unset is not a request for more: it inherits this one when the two are tightened."""
        out: list[str] = []
        mine, theirs = self.voltage_min_V, other.voltage_min_V
        if mine is not None and theirs is not None and theirs < mine:
            out.append(f"voltage_min_V {theirs} is below the channel's {mine}")
        mine, theirs = self.voltage_max_V, other.voltage_max_V
        if mine is not None and theirs is not None and theirs > mine:
            out.append(f"voltage_max_V {theirs} is above the channel's {mine}")
        mine, theirs = self.current_max_A, other.current_max_A
        if mine is not None and theirs is not None and theirs > mine:
            out.append(f"current_max_A {theirs} is above the channel's {mine}")
        mine, theirs = self.sample_interval_max_s, other.sample_interval_max_s
        if mine is not None and theirs is not None and theirs > mine:
            out.append(f"sample_interval_max_s {theirs} is above the channel's {mine}")
        return out

    def sample_interval_bound_s(self) -> float:
        """The longest sample interval these limits allow (the default when none is set)."""
        return self.sample_interval_max_s if self.sample_interval_max_s is not None else DEFAULT_SAMPLE_INTERVAL_MAX_S
