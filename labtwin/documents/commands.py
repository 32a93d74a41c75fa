"""Flow -> agent documents on .../cmd: start, step, pause, resume, end a step, stop."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator

from labtwin.documents.base import Count, Document, Finite, StoreInt
from labtwin.documents.data import StepStats
from labtwin.documents.limits import Limits
from labtwin.documents.steps import (
    EisSettings,
    EndConditions,
    EndReason,
    GittSettings,
    RecordRule,
    StepKind,
    SweepSettings,
)
from labtwin.documents.twin import Action, AnomalyKind


class ResumePoint(Finite):
    """Where a run that was interrupted stands in the store, so a resumed run continues its record:
    sample batches go on numbering after the last one stored (the store drops a repeated seq as a
    duplicate), test time and counted charge go on from their last values."""

    model_config = ConfigDict(extra="forbid")

    next_seq: Count
    time_s: float = Field(ge=0)
    capacity_Ah: float = 0.0
    n_samples: Count = 0
    step_index: StoreInt | None = Field(None, description="the step the crash interrupted, if one was running")
    step_stats: StepStats | None = Field(
        None,
        description="what that step had done before the crash, from the stored samples: the agent adds it to "
        "the step's statistics when the step runs on, so its charge is the whole step's",
    )


class StartRun(Document):
    """Flow -> agent: a run begins on this channel (the agent publishes RunStart)."""

    kind: Literal["start_run"] = "start_run"
    run_id: str
    channel: str
    cell_id: str
    protocol: str
    n_steps: Count
    flow_run_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict, description="free-form notes carried to RunStart")
    anomaly_policy: dict[AnomalyKind, Action] = Field(
        default_factory=dict,
        description="the protocol's `anomalies:` section: what the twin does when it finds each kind "
        "(notify when a kind is not named); the agent carries it to RunStart, where the twin reads it",
    )
    resume: ResumePoint | None = Field(None, description="set when the run resumes after a crash")


class StepCommand(Document):
    """Flow -> agent: run one step. Compiled from a protocol, inspectable before it runs."""

    kind: Literal["step"] = "step"
    run_id: str
    step_index: Count = Field(description="position in the compiled step list")
    label: str = ""
    cycle: Count = Field(
        0,
        description="the electrochemical cycle the step belongs to (labtwin.analysis.cycles), set by the "
        "interpreter when it sends the step; the agent stamps it on the step's samples and events",
    )
    repetition: Count = Field(
        0, description="the protocol's loop counter: which repetition of its repeat or loop (0 outside one)"
    )
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
    def _setpoint_matches_kind(self) -> StepCommand:
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
    step_index: StoreInt
    reason: EndReason


MAX_RESEND_RANGES = 1000


class ResendRequest(Document):
    """Recorder -> agent: publish these batches of a run again from the spool (inclusive seq ranges), and with
    ``events`` the run's events too. ``complete``: the store holds the whole run (its RunStop and every batch up
    to its last_seq), so the agent may drop the run from its spool."""

    kind: Literal["resend"] = "resend"
    run_id: str
    channel: str
    ranges: list[tuple[Count, Count]] = Field(default_factory=list, max_length=MAX_RESEND_RANGES)
    events: bool = False
    complete: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ResendRequest:
        for first, last in self.ranges:
            if first > last:
                raise ValueError(f"resend range {first}-{last}: first seq after last")
        return self


Command = Annotated[
    StartRun | StepCommand | StopRun | PauseRun | ResumeRun | EndStep | ResendRequest, Field(discriminator="kind")
]
