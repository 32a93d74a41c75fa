"""The step vocabulary shared by commands and events: kinds, technique settings, end conditions, end reasons."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import ConfigDict, Field

from labtwin.documents.base import Finite


class StepKind(str, Enum):
    rest = "rest"
    cp = "cp"  # constant power, host-timed: the current is re-set to P / V every sample
    cc = "cc"  # constant current
    cv = "cv"  # constant voltage hold (not cyclic voltammetry: that is ``cyclic_voltammetry``)
    cccv = "cccv"  # constant current, then hold at the voltage it reaches, in one step
    gitt = "gitt"  # galvanostatic intermittent titration: pulse + relaxation, repeated to a cut-off
    cyclic_voltammetry = "cyclic_voltammetry"  # potential sweeps between vertices at a scan rate
    eis = "eis"  # impedance spectroscopy (potentiostatic or galvanostatic), device-run


class GittSettings(Finite):
    """Pulse + relaxation, repeated until a pulse ends beyond ``end.voltage_V`` or ``max_pulses``."""

    model_config = ConfigDict(extra="forbid")

    pulse_s: float = Field(gt=0)
    relax_s: float = Field(gt=0)
    max_pulses: int = Field(1000, ge=1, le=1_000_000)


class SweepSettings(Finite):
    """Cyclic voltammetry: start -> vertex_1 -> vertex_2 -> vertex_1 ... for ``cycles``, at ``scan_rate_V_s``,
    in potential steps of ``step_V`` (a staircase, as digital potentiostats apply it)."""

    model_config = ConfigDict(extra="forbid")

    start_V: float
    vertex_1_V: float
    vertex_2_V: float
    scan_rate_V_s: float = Field(gt=0)
    cycles: int = Field(1, ge=1, le=1000)
    step_V: float = Field(0.001, gt=0, le=0.1)

    def potentials_V(self) -> list[float]:
        """The staircase of set potentials, one per sample."""
        import numpy as np

        def leg(a: float, b: float) -> list[float]:
            n = max(1, int(round(abs(b - a) / self.step_V)))
            return list(np.linspace(a, b, n + 1)[1:])

        out: list[float] = []
        here = self.start_V
        for _ in range(self.cycles):
            out += leg(here, self.vertex_1_V)
            out += leg(self.vertex_1_V, self.vertex_2_V)
            here = self.vertex_2_V
        out += leg(here, self.start_V)
        return out

    def duration_s(self) -> float:
        return len(self.potentials_V()) * self.step_V / self.scan_rate_V_s


class EisSettings(Finite):
    """Impedance from ``f_start_Hz`` down (or up) to ``f_end_Hz``, log-spaced, around open circuit."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["potentiostatic", "galvanostatic"] = "potentiostatic"
    f_start_Hz: float = Field(1e5, gt=0)
    f_end_Hz: float = Field(0.1, gt=0)
    points_per_decade: int = Field(10, ge=1, le=100)
    amplitude: float = Field(0.005, gt=0, description="V for potentiostatic, A for galvanostatic")
    periods: float = Field(2.0, gt=0, description="periods measured per frequency (sets the step's duration)")

    def frequencies_Hz(self) -> list[float]:
        import numpy as np

        decades = abs(np.log10(self.f_end_Hz / self.f_start_Hz))
        n = max(2, int(round(decades * self.points_per_decade)) + 1)
        return list(np.logspace(np.log10(self.f_start_Hz), np.log10(self.f_end_Hz), n))

    def duration_s(self) -> float:
        return sum(max(self.periods / f, 0.1) for f in self.frequencies_Hz())


class EndConditions(Finite):
    """When a step has done its job (a normal end, not a safety trip).

    ``voltage_V`` for a constant-current step is reached in the direction the
    current drives the cell: charging ends at or above it, discharging at or
    below it. ``current_A`` for a constant-voltage step is a magnitude the
    current decays to. ``capacity_Ah`` is the magnitude of charge passed in
    the step.
    """

    model_config = ConfigDict(extra="forbid")

    time_s: float | None = Field(None, gt=0)
    voltage_V: float | None = None
    current_A: float | None = Field(None, gt=0)
    capacity_Ah: float | None = Field(None, gt=0)
    dvdt_V_per_h: float | None = Field(
        None,
        gt=0,
        description="ends when |dV/dt| over the last DVDT_WINDOW_SAMPLES samples falls below this "
        "(a relaxation criterion: rest until the cell is near equilibrium)",
    )
    twin_soc: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="ends when the digital twin's state of charge reaches this, from whichever "
        "side the step started: watched by the flow, which sends EndStep (the agent's own conditions stay the backstop)",
    )


# dV/dt is a slope over this many samples: fewer reads sampling noise as a slope.
DVDT_WINDOW_SAMPLES = 10


class RecordRule(Finite):
    """Which of a step's samples are recorded: the agent reads the instrument every ``sample_interval_s`` (and
    checks every reading against the limits and end conditions) but records a reading only when this much time
    has passed, or the voltage or current has moved this much, since the last recorded one (a cycler's
    "record every dt or dV or dI"). The first and last readings of a step are always recorded."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(gt=0)
    voltage_change_V: float | None = Field(None, gt=0)
    current_change_A: float | None = Field(None, gt=0)

    def due(self, dt_s: float, dv_V: float, di_A: float) -> bool:
        return (
            dt_s >= self.interval_s - 1e-9
            or (self.voltage_change_V is not None and abs(dv_V) >= self.voltage_change_V)
            or (self.current_change_A is not None and abs(di_A) >= self.current_change_A)
        )


class EndReason(Finite):
    """Why a step ended: a named condition or limit and the value that met it."""

    kind: Literal["end_condition", "safety_limit", "aborted", "error"]
    name: str
    value: float | None = None
    threshold: float | None = None
    message: str = ""
