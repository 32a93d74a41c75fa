"""Agent -> all documents on .../data and .../event: run start, samples, step events, run stop."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import Field, model_validator

from labtwin.documents.base import MAX_BATCH_SAMPLES, Count, Document, Finite, MaybeReading, StoreInt, utc_now
from labtwin.documents.steps import EndReason, StepKind
from labtwin.documents.twin import Action, AnomalyKind


class Column(Finite):
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
    Column(name="cycle", unit="1", description="electrochemical cycle (labtwin.analysis.cycles)"),
)


class RunStart(Document):
    """Agent -> all: a run began. Carries the descriptor: what the sample columns are."""

    kind: Literal["run_start"] = "run_start"
    run_id: str
    lab: str
    channel: str
    cell_id: str
    protocol: str
    n_steps: StoreInt
    time: datetime = Field(default_factory=utc_now)
    columns: list[Column] = Field(default_factory=lambda: list(SAMPLE_COLUMNS))
    sign_convention: str = "positive current charges the cell"
    flow_run_id: str | None = None
    first_seq: Count = Field(
        0, description="seq of this start's first batch: above 0 when a resumed run goes on numbering its record"
    )
    metadata: dict[str, str] = Field(default_factory=dict)
    anomaly_policy: dict[AnomalyKind, Action] = Field(
        default_factory=dict, description="what the twin does on each anomaly kind (StartRun.anomaly_policy)"
    )


class StepStats(Finite):
    """What a step did, measured by the agent: enough to summarise a run without its samples."""

    duration_s: float = 0.0
    charge_Ah: float = Field(0.0, ge=0, description="charge put into the cell")
    discharge_Ah: float = Field(0.0, ge=0, description="charge taken out of the cell")
    energy_in_Wh: float = 0.0
    energy_out_Wh: float = 0.0
    start_voltage_V: MaybeReading = None
    end_voltage_V: MaybeReading = None
    end_current_A: MaybeReading = None
    n_samples: StoreInt = 0
    first_seq: StoreInt | None = None
    last_seq: StoreInt | None = None

    def continued_by(self, later: StepStats) -> StepStats:
        """A step interrupted after these statistics (a crash) and run on as ``later``: the whole step's,
        so its charge counts what passed before the crash (labtwin.analysis.cycles)."""
        return later.model_copy(
            update={
                "duration_s": self.duration_s + later.duration_s,
                "charge_Ah": self.charge_Ah + later.charge_Ah,
                "discharge_Ah": self.discharge_Ah + later.discharge_Ah,
                "energy_in_Wh": self.energy_in_Wh + later.energy_in_Wh,
                "energy_out_Wh": self.energy_out_Wh + later.energy_out_Wh,
                "start_voltage_V": self.start_voltage_V if self.start_voltage_V is not None else later.start_voltage_V,
                "n_samples": self.n_samples + later.n_samples,
                "first_seq": self.first_seq if self.first_seq is not None else later.first_seq,
            }
        )


class StepEvent(Document):
    """Agent -> all: a step started or ended."""

    kind: Literal["step_event"] = "step_event"
    run_id: str
    channel: str
    step_index: StoreInt
    label: str = ""
    cycle: StoreInt = Field(0, description="the electrochemical cycle the step belongs to (labtwin.analysis.cycles)")
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
    n_samples: StoreInt = 0
    n_batches: StoreInt = 0
    last_seq: StoreInt = -1
    cell_time_s: float = 0.0


class SecurityEvent(Document):
    """Agent -> all: a command it refused (unsigned, wrongly signed, replayed, or from a sender not allowed
    there). The running step goes on; the event names who the command claimed to be from, so a lab sees
    an attack or a misconfigured client instead of a silent drop."""

    kind: Literal["security"] = "security"
    lab: str
    channel: str
    topic: str
    sender: str | None = None
    reason: str
    time: datetime = Field(default_factory=utc_now)


class Outage(Document):
    """Agent -> all: a stretch of a run in which no agent read the instrument (the agent died and was restarted).

    Never a seamless record: what the instrument did while nobody watched is unknown unless the instrument
    itself can tell (an integrating coulometer could; a Keithley 2450 cannot, so ``charge_Ah`` is None and
    ``charge_known`` False). ``from_time_s`` is the run time of the last sample before the outage, ``to_time_s``
    the run time at which the restarted agent had the instrument again (its safe state, before any reading: a 2450
    with its output off cannot measure). Cell time across a restart is the wall-clock gap at the channel's speed
    (a clock does not survive its process); ``wall_span_s`` is the gap itself."""

    kind: Literal["outage"] = "outage"
    run_id: str
    channel: str
    cause: Literal["agent_restart"] = "agent_restart"
    step_index: StoreInt | None = Field(None, description="the step the outage cut, if one was running")
    from_time_s: float = Field(ge=0, le=1e10, description="cell time since run start of the last sample before it")
    to_time_s: float = Field(ge=0, le=1e10, description="cell time since run start when the agent was back")
    span_s: float = Field(ge=0, le=1e10, description="to_time_s - from_time_s, cell seconds")
    wall_from: datetime = Field(description="wall time of the agent's last record before the outage")
    wall_to: datetime = Field(description="wall time at which the restarted agent had the instrument again")
    wall_span_s: float = Field(ge=0, le=1e10)
    charge_Ah: float | None = Field(None, description="charge the instrument passed in the outage, if it reports it")
    charge_known: bool = False
    message: str = Field("", max_length=500)
    time: datetime = Field(default_factory=utc_now)

    @model_validator(mode="after")
    def _consistent(self) -> Outage:
        if self.to_time_s < self.from_time_s:
            raise ValueError(f"to_time_s {self.to_time_s} is before from_time_s {self.from_time_s}")
        if self.charge_known != (self.charge_Ah is not None):
            raise ValueError("charge_known says whether charge_Ah is given")
        return self


Event = Annotated[RunStart | StepEvent | RunStop | SecurityEvent | Outage, Field(discriminator="kind")]


# What no battery test measures, whatever the instrument: a reading beyond these is a garbled or forged batch
# (1e308 V was stored as a reading before) and the whole batch is refused as malformed, naming the column.
# Wide on purpose: a pack cycler reaches 1 kV and 1 kA; the bounds reject the absurd, not the unusual.
VOLTAGE_BOUND_V: Final = 1.0e4
CURRENT_BOUND_A: Final = 1.0e5
CAPACITY_BOUND_AH: Final = 1.0e7
TIME_BOUND_S: Final = 1.0e10  # 317 years of cell time
TEMPERATURE_MIN_C: Final = -273.15
TEMPERATURE_MAX_C: Final = 3000.0
Voltage = Annotated[float, Field(ge=-VOLTAGE_BOUND_V, le=VOLTAGE_BOUND_V)]
Current = Annotated[float, Field(ge=-CURRENT_BOUND_A, le=CURRENT_BOUND_A)]
Capacity = Annotated[float, Field(ge=-CAPACITY_BOUND_AH, le=CAPACITY_BOUND_AH)]
CellTime = Annotated[float, Field(ge=-TIME_BOUND_S, le=TIME_BOUND_S)]
Temperature = Annotated[float, Field(ge=TEMPERATURE_MIN_C, le=TEMPERATURE_MAX_C)]
FREQUENCY_MAX_HZ: Final = 1.0e10
IMPEDANCE_BOUND_OHM: Final = 1.0e15  # a good dielectric's teraohms, with room
Frequency = Annotated[float, Field(ge=0.0, le=FREQUENCY_MAX_HZ)]
Impedance = Annotated[float, Field(ge=-IMPEDANCE_BOUND_OHM, le=IMPEDANCE_BOUND_OHM)]


class SampleBatch(Document):
    """Agent -> all: consecutive samples of one run, numbered without gaps by ``seq``.

    Arrays rather than one message per sample: one MQTT message per ~100
    samples keeps the bus far from its message-rate ceiling (DESIGN.md).
    """

    kind: Literal["samples"] = "samples"
    run_id: str
    channel: str
    seq: Count
    time_s: list[CellTime] = Field(max_length=MAX_BATCH_SAMPLES, description="every column has as many values")
    voltage_V: list[Voltage | None] = Field(
        description="None where the instrument returned no number (NaN): the reading the agent tripped on, kept"
    )
    current_A: list[Current | None] = Field(description="None where the instrument returned no number (NaN)")
    capacity_Ah: list[Capacity]
    temperature_C: list[Temperature | None] = Field(
        description="None where the channel has no temperature sensor (JSON has no NaN)"
    )
    step: list[StoreInt]
    cycle: list[StoreInt]
    frequency_Hz: list[Frequency] | None = Field(None, description="impedance steps only")
    z_real_ohm: list[Impedance] | None = None
    z_imag_ohm: list[Impedance] | None = None

    @model_validator(mode="after")
    def _same_length(self) -> SampleBatch:
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
