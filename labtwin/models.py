"""The documents that travel on labtwin's bus and land in its store.

Every payload is a versioned pydantic model with a literal ``kind`` so a
subscriber can tell documents apart on one topic and refuse what it does not
understand (a wrong-schema payload is counted and skipped, never crashes).

Sign convention, the same in every file format labtwin reads or writes:
**positive current charges the cell** (PyBaMM uses the opposite sign; any
conversion to or from PyBaMM says so where it happens).

``capacity_Ah`` in a sample is the net charge passed since the start of the
run, with the same sign: it rises while charging and falls while discharging,
so a V-Q curve is a plot of voltage against it and a step's charge is the
difference of its first and last value.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SCHEMA_VERSION = 1


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Document(BaseModel):
    """Base of every bus document: strict about unknown fields so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    v: Literal[1] = SCHEMA_VERSION


# --------------------------------------------------------------------------- limits


class Limits(BaseModel):
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
        None, gt=0, description="charge passed in one step (either sign): the backstop when a voltage end condition "
        "is never met (a soft short charging forever)")
    trip_delay_s: float | None = Field(
        None, ge=0, description="a voltage, current or temperature limit trips only once exceeded this long (cell "
        "time, every sample in between over it): rides through a one-sample spike; NaN readings and the step "
        "time limit trip at once")
    action: Literal["stop", "safe_state", "pause"] | None = Field(
        None, description="on a trip: stop (default) or safe_state, both output off and the run ends failed; pause: "
        "open circuit and the run waits for `labtwin resume` (a limit still exceeded at open circuit stops it)")

    @model_validator(mode="after")
    def _ordered(self) -> "Limits":
        if (
            self.voltage_min_V is not None
            and self.voltage_max_V is not None
            and self.voltage_min_V >= self.voltage_max_V
        ):
            raise ValueError(
                f"voltage_min_V ({self.voltage_min_V}) must be below voltage_max_V ({self.voltage_max_V})"
            )
        if (
            self.temperature_min_C is not None
            and self.temperature_max_C is not None
            and self.temperature_min_C >= self.temperature_max_C
        ):
            raise ValueError("temperature_min_C must be below temperature_max_C")
        return self

    def tighten(self, other: "Limits | None") -> "Limits":
        """The tighter of two limit sets, field by field (channel vs protocol)."""
        if other is None:
            return self

        def pick(a: float | None, b: float | None, tighter) -> float | None:
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
            # The safer action wins: a channel that stops on a trip is not paused by a protocol.
            action=pick(self.action, other.action, lambda a, b: a if a != "pause" else b),
        )

    def violations_of(self, other: "Limits") -> list[str]:
        """What ``other`` asks for beyond these limits (empty if nothing). A limit ``other``
        leaves unset is not a request for more: it inherits this one when the two are tightened."""
        out: list[str] = []
        if None not in (self.voltage_min_V, other.voltage_min_V) and other.voltage_min_V < self.voltage_min_V:
            out.append(f"voltage_min_V {other.voltage_min_V} is below the channel's {self.voltage_min_V}")
        if None not in (self.voltage_max_V, other.voltage_max_V) and other.voltage_max_V > self.voltage_max_V:
            out.append(f"voltage_max_V {other.voltage_max_V} is above the channel's {self.voltage_max_V}")
        if None not in (self.current_max_A, other.current_max_A) and other.current_max_A > self.current_max_A:
            out.append(f"current_max_A {other.current_max_A} is above the channel's {self.current_max_A}")
        return out


# --------------------------------------------------------------------------- commands


class StepKind(str, Enum):
    rest = "rest"
    cp = "cp"  # constant power, host-timed: the current is re-set to P / V every sample
    cc = "cc"  # constant current
    cv = "cv"  # constant voltage hold (not cyclic voltammetry: that is ``cyclic_voltammetry``)
    cccv = "cccv"  # constant current, then hold at the voltage it reaches, in one step
    gitt = "gitt"  # galvanostatic intermittent titration: pulse + relaxation, repeated to a cut-off
    cyclic_voltammetry = "cyclic_voltammetry"  # potential sweeps between vertices at a scan rate
    eis = "eis"  # impedance spectroscopy (potentiostatic or galvanostatic), device-run


class GittSettings(BaseModel):
    """Pulse + relaxation, repeated until a pulse ends beyond ``end.voltage_V`` or ``max_pulses``."""

    model_config = ConfigDict(extra="forbid")

    pulse_s: float = Field(gt=0)
    relax_s: float = Field(gt=0)
    max_pulses: int = Field(1000, ge=1)


class SweepSettings(BaseModel):
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


class EisSettings(BaseModel):
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


class EndConditions(BaseModel):
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
        None, gt=0, description="ends when |dV/dt| over the last DVDT_WINDOW_SAMPLES samples falls below this "
        "(a relaxation criterion: rest until the cell is near equilibrium)")
    twin_soc: float | None = Field(
        None, gt=0, lt=1, description="ends when the digital twin's state of charge reaches this, from whichever "
        "side the step started: watched by the flow, which sends EndStep (the agent's own conditions stay the backstop)")


# dV/dt is a slope over this many samples: fewer reads sampling noise as a slope.
DVDT_WINDOW_SAMPLES = 10


class ResumePoint(BaseModel):
    """Where a run that was interrupted stands in the store, so a resumed run continues its record:
    sample batches go on numbering after the last one stored (the store drops a repeated seq as a
    duplicate), test time and counted charge go on from their last values."""

    model_config = ConfigDict(extra="forbid")

    next_seq: int = Field(ge=0)
    time_s: float = Field(ge=0)
    capacity_Ah: float = 0.0
    n_samples: int = Field(0, ge=0)


class StartRun(Document):
    """Flow -> agent: a run begins on this channel (the agent publishes RunStart)."""

    kind: Literal["start_run"] = "start_run"
    run_id: str
    channel: str
    cell_id: str
    protocol: str
    n_steps: int = Field(ge=0)
    flow_run_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    resume: ResumePoint | None = Field(None, description="set when the run resumes after a crash")


class RecordRule(BaseModel):
    """Which of a step's samples are recorded: the agent reads the instrument every ``sample_interval_s`` (and
    checks every reading against the limits and end conditions) but records a reading only when this much time
    has passed, or the voltage or current has moved this much, since the last recorded one (a cycler's
    "record every dt or dV or dI"). The first and last readings of a step are always recorded."""

    model_config = ConfigDict(extra="forbid")

    interval_s: float = Field(gt=0)
    voltage_change_V: float | None = Field(None, gt=0)
    current_change_A: float | None = Field(None, gt=0)

    def due(self, dt_s: float, dv_V: float, di_A: float) -> bool:
        return (dt_s >= self.interval_s - 1e-9
                or (self.voltage_change_V is not None and abs(dv_V) >= self.voltage_change_V)
                or (self.current_change_A is not None and abs(di_A) >= self.current_change_A))


class StepCommand(Document):
    """Flow -> agent: run one step. Compiled from a protocol, inspectable before it runs."""

    kind: Literal["step"] = "step"
    run_id: str
    step_index: int = Field(ge=0, description="position in the compiled step list")
    label: str = ""
    cycle: int = Field(0, ge=0)
    step: StepKind
    current_A: float | None = Field(None, description="cc setpoint; positive charges")
    voltage_V: float | None = Field(None, description="cv setpoint")
    power_W: float | None = Field(None, description="cp setpoint; positive charges")
    end: EndConditions = Field(default_factory=EndConditions)
    limits: Limits = Field(default_factory=Limits)
    sample_interval_s: float = Field(1.0, gt=0, description="how often the agent reads the instrument")
    record: RecordRule | None = Field(None, description="record only some readings (none: every one)")
    gitt: GittSettings | None = None
    sweep: SweepSettings | None = None
    eis: EisSettings | None = None

    @model_validator(mode="after")
    def _setpoint_matches_kind(self) -> "StepCommand":
        if self.step in (StepKind.cc, StepKind.cccv, StepKind.gitt) and self.current_A is None:
            raise ValueError(f"a {self.step.value} step needs current_A")
        if self.step is StepKind.cp and not self.power_W:
            raise ValueError("a cp step needs a non-zero power_W")
        if self.step in (StepKind.cv, StepKind.cccv) and self.voltage_V is None:
            raise ValueError(f"a {self.step.value} step needs voltage_V")
        if self.step is StepKind.gitt and self.gitt is None:
            raise ValueError("a gitt step needs gitt settings (pulse_s, relax_s)")
        if self.step is StepKind.cyclic_voltammetry and self.sweep is None:
            raise ValueError("a cyclic_voltammetry step needs sweep settings")
        if self.step is StepKind.eis and self.eis is None:
            raise ValueError("an eis step needs eis settings")
        if self.end.time_s is None and self.limits.step_time_max_s is None:
            raise ValueError("every step needs a time bound: end.time_s or limits.step_time_max_s")
        for name in ("current_A", "voltage_V", "power_W"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        return self

    def time_budget_s(self) -> float:
        """Longest this step may take in cell time: what the flow's timeout derives from."""
        candidates = [t for t in (self.end.time_s, self.limits.step_time_max_s) if t is not None]
        return min(candidates)


class StopRun(Document):
    """Flow -> agent: the run is over (or aborted); the agent publishes RunStop."""

    kind: Literal["stop_run"] = "stop_run"
    run_id: str
    exit_status: Literal["success", "aborted", "failed"] = "success"
    reason: str = ""


class PauseRun(Document):
    """Twin or operator -> agent: hold the run. The source goes to open circuit within one sample (host-timed
    steps; a device-run technique finishes first) and sampling goes on, so the relaxing cell is still watched
    and the safety limits still apply; no step advances until ResumeRun."""

    kind: Literal["pause_run"] = "pause_run"
    run_id: str
    reason: str = ""


class ResumeRun(Document):
    """Operator -> agent: the paused run goes on where it stopped (the step's source setting is re-applied;
    time spent paused does not count toward the step's time)."""

    kind: Literal["resume_run"] = "resume_run"
    run_id: str


class EndStep(Document):
    """Flow -> agent: end the running step now, on a condition the agent cannot see (the twin's state of
    charge). The agent ends it within a sample as if one of its own end conditions had been met."""

    kind: Literal["end_step"] = "end_step"
    run_id: str
    step_index: int
    reason: EndReason


Command = Annotated[Union[StartRun, StepCommand, StopRun, PauseRun, ResumeRun, EndStep], Field(discriminator="kind")]


# --------------------------------------------------------------------------- documents


class Column(BaseModel):
    name: str
    unit: str
    description: str = ""


SAMPLE_COLUMNS: tuple[Column, ...] = (
    Column(name="time_s", unit="s", description="cell time since the run started"),
    Column(name="voltage_V", unit="V", description="terminal voltage"),
    Column(name="current_A", unit="A", description="positive charges the cell"),
    Column(name="capacity_Ah", unit="Ah", description="net charge since run start, positive = charged in"),
    Column(name="temperature_C", unit="degC", description="cell temperature"),
    Column(name="step", unit="1", description="index in the compiled step list"),
    Column(name="cycle", unit="1", description="cycle number from the protocol"),
)


class RunStart(Document):
    """Agent -> all: a run began. Carries the descriptor: what the sample columns are."""

    kind: Literal["run_start"] = "run_start"
    run_id: str
    lab: str
    channel: str
    cell_id: str
    protocol: str
    n_steps: int
    time: datetime = Field(default_factory=utc_now)
    columns: list[Column] = Field(default_factory=lambda: list(SAMPLE_COLUMNS))
    sign_convention: str = "positive current charges the cell"
    flow_run_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class StepStats(BaseModel):
    """What a step did, measured by the agent: enough to summarise a run without its samples."""

    duration_s: float = 0.0
    charge_Ah: float = Field(0.0, ge=0, description="charge put into the cell")
    discharge_Ah: float = Field(0.0, ge=0, description="charge taken out of the cell")
    energy_in_Wh: float = 0.0
    energy_out_Wh: float = 0.0
    start_voltage_V: float | None = None
    end_voltage_V: float | None = None
    end_current_A: float | None = None
    n_samples: int = 0
    first_seq: int | None = None
    last_seq: int | None = None


class EndReason(BaseModel):
    """Why a step ended: a named condition or limit and the value that met it."""

    kind: Literal["end_condition", "safety_limit", "aborted", "error"]
    name: str
    value: float | None = None
    threshold: float | None = None
    message: str = ""


class StepEvent(Document):
    """Agent -> all: a step started or ended."""

    kind: Literal["step_event"] = "step_event"
    run_id: str
    channel: str
    step_index: int
    label: str = ""
    cycle: int = 0
    step: StepKind
    event: Literal["started", "ended"]
    time_s: float = Field(description="cell time since run start")
    wall_time: datetime = Field(default_factory=utc_now)
    reason: EndReason | None = None
    stats: StepStats | None = None


class RunStop(Document):
    """Agent -> all: a run ended; the counts let a subscriber check it has everything."""

    kind: Literal["run_stop"] = "run_stop"
    run_id: str
    channel: str
    exit_status: Literal["success", "aborted", "failed"]
    reason: str = ""
    time: datetime = Field(default_factory=utc_now)
    n_samples: int = 0
    n_batches: int = 0
    last_seq: int = -1
    cell_time_s: float = 0.0


Event = Annotated[Union[RunStart, StepEvent, RunStop], Field(discriminator="kind")]


class SampleBatch(Document):
    """Agent -> all: consecutive samples of one run, numbered without gaps by ``seq``.

    Arrays rather than one message per sample: one MQTT message per ~100
    samples keeps the bus far from its message-rate ceiling (DESIGN.md).
    """

    kind: Literal["samples"] = "samples"
    run_id: str
    channel: str
    seq: int = Field(ge=0)
    time_s: list[float]
    voltage_V: list[float]
    current_A: list[float]
    capacity_Ah: list[float]
    temperature_C: list[float | None] = Field(description="None where the channel has no temperature sensor (JSON has no NaN)")
    step: list[int]
    cycle: list[int]
    frequency_Hz: list[float] | None = Field(None, description="impedance steps only")
    z_real_ohm: list[float] | None = None
    z_imag_ohm: list[float] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> "SampleBatch":
        n = len(self.time_s)
        for name in ("voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} values, time_s has {n}")
        for name in ("frequency_Hz", "z_real_ohm", "z_imag_ohm"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} values, time_s has {n}")
        return self

    def __len__(self) -> int:
        return len(self.time_s)


class ChannelState(str, Enum):
    idle = "idle"
    running = "running"
    paused = "paused"
    fault = "fault"
    offline = "offline"


class ChannelStatus(Document):
    """Agent -> all, retained: what a channel is doing now. Its last will says offline."""

    kind: Literal["status"] = "status"
    channel: str
    state: ChannelState
    time: datetime = Field(default_factory=utc_now)
    cell_id: str | None = None
    driver: str | None = None
    speed: float | None = Field(None, description="cell seconds per wall second; None = as fast as possible")
    run_id: str | None = None
    step_index: int | None = None
    label: str | None = None
    cycle: int | None = None
    voltage_V: float | None = None
    current_A: float | None = None
    temperature_C: float | None = None
    message: str = ""
    limits: Limits | None = Field(None, description="the channel's own safety limits, enforced by its agent")
    nominal_capacity_Ah: float | None = Field(None, description="of the cell on this channel, for C-rates")


COMMAND_ADAPTER: TypeAdapter[StartRun | StepCommand | StopRun | PauseRun | ResumeRun] = TypeAdapter(Command)
EVENT_ADAPTER: TypeAdapter[RunStart | StepEvent | RunStop] = TypeAdapter(Event)
