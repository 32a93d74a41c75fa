"""What every driver and every simulator offers the agent.

Two capabilities, as small ``typing.Protocol``s (the Bluesky way, not a base
class tree):

- ``Potentiostat``: host-timed control. The agent sets a source, then reads a
  sample per interval and checks limits itself. A Keithley 2450 used as a
  galvanostat maps one to one: ``set_current`` is ``:SOUR:FUNC CURR``,
  ``:SOUR:CURR <A>``, ``:SOUR:CURR:VLIM <V>``, ``:OUTP ON``; ``read`` is ``:READ?``;
  ``output_off`` is ``:OUTP OFF``.
- ``RunsTechniques``: device-run techniques. The instrument runs a whole
  technique (a PalmSens MethodSCRIPT CV, a BioLogic technique) and streams
  points; the agent still checks every streamed point and may ``abort``.

The agent chooses per step: a step a driver can run as a technique goes to
``run_technique``, anything else is host-timed. Sign: positive current charges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from labtwin.documents import StepCommand, StepKind

VoltageLimitKind = Literal["clamp", "magnitude"]
"""What a current source's voltage limit does, a property of each driver's instrument (``voltage_limit_kind``):

- ``clamp``: the limit bounds the voltage in the direction the current drives the cell, either way: a
  discharge with its limit at the cut-off is held there (a cycler's CC step with an E limit). The
  simulated potentiostat does this unless it stands for an instrument that does not.
- ``magnitude``: the limit bounds |V| (a Keithley 2450's ``:SOUR:CURR:VLIM``, a B2900's
  ``:SENS:VOLT:PROT``). Charging it is the upper voltage; discharging it cannot be a lower bound, so the
  driver sets the channel's ceiling and the current goes on until the agent ends the step, past the cut-off
  into the negative voltages if the agent does not. A simulated channel that stands for such an instrument
  does the same, so a dry-run predicts what the bench does (issue 14).
"""


def voltage_limit_kind(driver: object) -> VoltageLimitKind:
    """The driver's ``voltage_limit_kind``; a driver that does not say clamps (the simulated potentiostat's)."""
    return "magnitude" if getattr(driver, "voltage_limit_kind", "clamp") == "magnitude" else "clamp"


@dataclass(slots=True)
class Reading:
    """One measured point. ``time_s`` is set by device-run techniques (instrument time);
    host-timed readings leave it None and the agent stamps its clock."""

    voltage_V: float
    current_A: float
    temperature_C: float = float("nan")
    time_s: float | None = None
    frequency_Hz: float | None = None  # impedance points only
    z_real_ohm: float | None = None
    z_imag_ohm: float | None = None


@runtime_checkable
class Potentiostat(Protocol):
    """Host-timed source/measure: what the agent's step loop needs from an instrument."""

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        """Source a constant current; the instrument's own compliance stops at voltage_limit_V."""

    def set_voltage(self, voltage_V: float, current_limit_A: float) -> None:
        """Hold a voltage; the instrument's own compliance stops at current_limit_A."""

    def open_circuit(self) -> None:
        """Measure the cell at zero current (a rest step)."""

    def read(self) -> Reading:
        """Measure one sample now."""

    def output_off(self) -> None:
        """Safe state: no current through the cell. Must be safe to call at any time, twice."""


@runtime_checkable
class RunsTechniques(Protocol):
    """An instrument that runs whole techniques itself and streams points back."""

    def supports(self, step: StepKind) -> bool:
        """Whether this step kind runs on the device (else the agent host-times it)."""

    def run_technique(self, command: StepCommand) -> Iterator[Reading]:
        """Start the technique and yield points as they arrive, ending when the device ends."""

    def abort(self) -> None:
        """Stop the running technique now and leave the cell disconnected."""
