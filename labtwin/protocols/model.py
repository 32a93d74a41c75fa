"""The protocol language: typed steps in YAML, validated by pydantic, compiled to StepCommands.

A protocol file has four sections (the shape aurora-unicycler and vendor
schedules share): ``metadata``, ``record`` (how often to sample), ``safety``
(limits the agent enforces every sample) and ``method`` (the steps).

Steps of the spine: ``rest``, ``cc`` (constant current, in amperes or as a
C-rate of the cell's nominal capacity), ``cv`` (constant voltage) and
``repeat`` (a cycle loop). Sign: positive current charges the cell, so a
discharge is a negative ``current_A`` or ``c_rate``.

Example::

    metadata: {name: LTO formation}
    record: {interval_s: 10}
    safety: {voltage_min_V: 0.9, voltage_max_V: 2.7}
    method:
      - rest: {duration_s: 600}
      - repeat: 3
        steps:
          - cc: {c_rate: -1.0, until: {voltage_V: 1.2, time_s: 5400}}
          - cc: {c_rate: 1.0, until: {voltage_V: 2.5, time_s: 5400}}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from labtwin.documents import AnomalyKind, Limits
from labtwin.protocols.safe_yaml import YamlError, dotted, parse_yaml, read_yaml_file
from labtwin.protocols.strings import StepStringError, parse_step_string

# Bounds on what one protocol may ask for (issue 14: each of these once hung labtwin or exhausted its memory).
# They are checked from the parameters, before anything is generated or expanded.
MAX_NESTING = 32  # repeats, loops and groups inside one another
MAX_COMPILED_STEPS = 100_000  # steps after every repeat is expanded (about 3 s and 200 MB to compile)
MAX_SWEEP_POINTS = 1_000_000  # potentials in one cyclic voltammetry sweep (per scan rate)
MAX_SCAN_RATES = 100
MAX_EIS_POINTS = 10_000  # frequencies in one spectrum
MAX_GITT_PULSES = 100_000


class _Strict(BaseModel):
    # No NaN or infinity anywhere in a protocol (``.inf``, or ``1e400`` which a float reads as one): a time bound
    # of infinity is no bound, and NaN compares false with every limit.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Until(_Strict):
    """End conditions of a step. ``voltage_V`` on a cc step is reached in the current's direction;
    ``current_A``/``c_rate`` on a cv step is the magnitude the current decays to."""

    time_s: float | None = Field(None, gt=0, description="step duration limit, seconds of cell time")
    voltage_V: float | None = Field(None, gt=0)
    current_A: float | None = Field(None, gt=0)
    c_rate: float | None = Field(None, gt=0, description="current threshold as a C-rate (cv steps)")
    capacity_Ah: float | None = Field(None, gt=0)
    dvdt_V_per_h: float | None = Field(
        None,
        gt=0,
        description="|dV/dt| falls below this (V per hour, over the last 10 samples): a relaxation criterion",
    )
    twin_soc: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="the digital twin's state of charge reaches this (needs `labtwin twin` running; "
        "the step's other end conditions stay as the backstop)",
    )

    @model_validator(mode="after")
    def _twin_needs_a_backstop(self) -> Until:
        if self.twin_soc is not None and all(
            getattr(self, k) is None for k in ("time_s", "voltage_V", "current_A", "c_rate", "capacity_Ah")
        ):
            raise ValueError("twin_soc needs a backstop the agent can see: add voltage_V, time_s or capacity_Ah")
        return self

    @model_validator(mode="after")
    def _one_current(self) -> Until:
        if self.current_A is not None and self.c_rate is not None:
            raise ValueError("give either current_A or c_rate, not both")
        return self


CONDITION_NAMES = ("time_s", "voltage_V", "current_A", "c_rate", "capacity_Ah", "dvdt_V_per_h", "twin_soc")


class Goto(_Strict):
    goto: str = Field(description="the tag of the step, loop or group to go to")


def _action_from_string(value):
    """ "goto charge" is sugar for {goto: charge}."""
    if isinstance(value, str) and value.strip().lower().startswith("goto "):
        return {"goto": value.strip()[5:].strip()}
    return value


Action = Annotated[Literal["next", "stop", "pause"] | Goto, BeforeValidator(_action_from_string)]


def _zero(current_A: float | None, c_rate: float | None) -> bool:
    """The setpoint given (current_A or c_rate) is zero: ``current_A or c_rate`` would read a 0 A as "not given"."""
    return (current_A if current_A is not None else c_rate) == 0


class _StepBase(_Strict):
    label: str = ""
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$", description="a name gotos can jump to")
    then: dict[
        Literal["time_s", "voltage_V", "current_A", "c_rate", "capacity_Ah", "dvdt_V_per_h", "twin_soc"], Action
    ] = Field(
        default_factory=dict,
        description="what follows when the step ends on each of its conditions: next (default), stop (the run "
        "ends, successfully), pause (open circuit until `labtwin resume`), or goto <tag>",
    )

    @model_validator(mode="after")
    def _then_names_own_conditions(self):
        until = getattr(self, "until", None)
        own = {k for k in CONDITION_NAMES if until is not None and getattr(until, k, None) is not None}
        if isinstance(self, RestStep):
            own.add("time_s")
        unknown = sorted(set(self.then) - own)
        if unknown:
            raise ValueError(
                f"then names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not among "
                f"this step's end conditions ({', '.join(sorted(own)) or 'none'})"
            )
        return self


class RestStep(_StepBase):
    duration_s: float = Field(gt=0, description="how long to rest at open circuit (at most, with until)")
    until: Until | None = Field(None, description="end the rest sooner, once the cell has relaxed: dvdt_V_per_h")

    @model_validator(mode="after")
    def _rest_ends(self) -> RestStep:
        if self.until is not None:
            extra = [
                k
                for k in ("time_s", "voltage_V", "current_A", "c_rate", "capacity_Ah")
                if getattr(self.until, k) is not None
            ]
            if extra:
                raise ValueError(
                    f"a rest ends on duration_s and until.dvdt_V_per_h, not until.{', until.'.join(extra)}"
                )
        return self


class CCStep(_StepBase):
    """Constant current. Positive charges; negative discharges."""

    current_A: float | None = None
    c_rate: float | None = Field(None, description="current as a multiple of nominal capacity per hour")
    until: Until

    @model_validator(mode="after")
    def _setpoint(self) -> CCStep:
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a cc step needs exactly one of current_A or c_rate (negative discharges)")
        if _zero(self.current_A, self.c_rate):
            raise ValueError("a cc step with zero current is a rest: use rest")
        if self.until.voltage_V is None and self.until.time_s is None and self.until.capacity_Ah is None:
            raise ValueError("a cc step needs until.voltage_V, until.time_s or until.capacity_Ah")
        if self.until.current_A is not None or self.until.c_rate is not None:
            raise ValueError("until.current_A / until.c_rate end cv steps, not cc steps")
        return self


class CPStep(_StepBase):
    """Constant power. Positive charges; negative discharges. The agent sets the current to P / V every
    sample (host-timed), so choose a sampling interval short against how fast V moves."""

    power_W: float = Field(description="watts; negative discharges")
    until: Until

    @model_validator(mode="after")
    def _ends(self) -> CPStep:
        if self.power_W == 0:
            raise ValueError("a cp step with zero power is a rest: use rest")
        if self.until.voltage_V is None and self.until.time_s is None and self.until.capacity_Ah is None:
            raise ValueError("a cp step needs until.voltage_V, until.time_s or until.capacity_Ah")
        if self.until.current_A is not None or self.until.c_rate is not None:
            raise ValueError("until.current_A / until.c_rate end cv steps, not cp steps")
        return self


class CVStep(_StepBase):
    """Constant voltage hold."""

    voltage_V: float = Field(gt=0)
    until: Until

    @model_validator(mode="after")
    def _ends(self) -> CVStep:
        if self.until.current_A is None and self.until.c_rate is None and self.until.time_s is None:
            raise ValueError("a cv step needs until.current_A, until.c_rate or until.time_s")
        if self.until.voltage_V is not None:
            raise ValueError("until.voltage_V ends cc steps; a cv step holds its voltage")
        return self


class CCCVStep(_StepBase):
    """Constant current to voltage_V, then hold voltage_V until the current tapers to until.current_A / c_rate."""

    current_A: float | None = None
    c_rate: float | None = None
    voltage_V: float = Field(gt=0)
    until: Until

    @model_validator(mode="after")
    def _setpoint(self) -> CCCVStep:
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a cccv step needs exactly one of current_A or c_rate")
        if _zero(self.current_A, self.c_rate):
            raise ValueError("a cccv step with zero current never reaches its voltage: give a current")
        if self.until.current_A is None and self.until.c_rate is None and self.until.time_s is None:
            raise ValueError("a cccv step needs until.current_A, until.c_rate or until.time_s")
        return self


class GittStep(_StepBase):
    """Galvanostatic intermittent titration: pulses of current_A / c_rate for pulse_s, each followed by
    relax_s at open circuit, until a pulse ends beyond until_voltage_V."""

    current_A: float | None = None
    c_rate: float | None = None
    pulse_s: float = Field(gt=0)
    relax_s: float = Field(gt=0)
    until_voltage_V: float = Field(gt=0)
    max_pulses: int = Field(1000, ge=1, le=MAX_GITT_PULSES)

    @model_validator(mode="after")
    def _setpoint(self) -> GittStep:
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a gitt step needs exactly one of current_A or c_rate (negative discharges)")
        if _zero(self.current_A, self.c_rate):
            raise ValueError("a gitt step with zero current titrates nothing: give a current (negative discharges)")
        return self


class VoltammetryStep(_StepBase):
    """Cyclic voltammetry: sweeps start -> vertex_1 -> vertex_2 (-> vertex_1 ...) at each scan rate in turn."""

    start_V: float
    vertex_1_V: float
    vertex_2_V: float
    scan_rate_V_s: float | list[float] = Field(description="one rate, or a list: one step per rate")
    cycles: int = Field(1, ge=1, le=1000)
    step_V: float = Field(0.001, gt=0, le=0.1)
    hold_start_s: float = Field(
        0.0,
        ge=0,
        description="hold start_V this long before each sweep, so every rate starts from an equilibrated film",
    )

    @field_validator("scan_rate_V_s")
    @classmethod
    def _positive_rates(cls, value: float | list[float]) -> float | list[float]:
        rates = value if isinstance(value, list) else [value]
        if not 1 <= len(rates) <= MAX_SCAN_RATES:
            raise ValueError(f"give one scan rate, or a list of 1 to {MAX_SCAN_RATES}")
        if any(rate <= 0 for rate in rates):
            raise ValueError("a scan rate is above 0 V/s")
        return value

    @model_validator(mode="after")
    def _bounded_sweep(self) -> VoltammetryStep:
        points = sweep_points(self.start_V, self.vertex_1_V, self.vertex_2_V, self.cycles, self.step_V)
        if points > MAX_SWEEP_POINTS:
            raise ValueError(
                f"step_V {self.step_V:g} V over these vertices and {self.cycles} cycle(s) makes more than "
                f"{MAX_SWEEP_POINTS} potentials per sweep: raise step_V or narrow the window"
            )
        return self


def sweep_points(start_V: float, vertex_1_V: float, vertex_2_V: float, cycles: int, step_V: float) -> int:
    """How many potentials SweepSettings.potentials_V would make, computed without making them (a huge count is
    returned as MAX_SWEEP_POINTS + 1, never computed to its end)."""
    too_many = MAX_SWEEP_POINTS + 1

    def leg(a: float, b: float) -> int:
        ratio = abs(b - a) / step_V
        return too_many if not math.isfinite(ratio) or ratio > too_many else max(1, int(round(ratio)))

    first = leg(start_V, vertex_1_V) + leg(vertex_1_V, vertex_2_V)
    again = leg(vertex_2_V, vertex_1_V) + leg(vertex_1_V, vertex_2_V)
    return min(too_many, first + (cycles - 1) * again + leg(vertex_2_V, start_V))


class EisStep(_StepBase):
    """Impedance spectrum around open circuit."""

    mode: Literal["potentiostatic", "galvanostatic"] = "potentiostatic"
    f_start_Hz: float = Field(1e5, gt=0)
    f_end_Hz: float = Field(0.1, gt=0)
    points_per_decade: int = Field(10, ge=1, le=100)
    amplitude: float = Field(0.005, gt=0, description="V (potentiostatic) or A (galvanostatic)")

    @model_validator(mode="after")
    def _bounded_spectrum(self) -> EisStep:
        decades = abs(math.log10(self.f_end_Hz) - math.log10(self.f_start_Hz))
        if decades * self.points_per_decade + 1 > MAX_EIS_POINTS:
            raise ValueError(
                f"{decades:.3g} decades at {self.points_per_decade} points per decade is more than "
                f"{MAX_EIS_POINTS} frequencies: narrow f_start_Hz..f_end_Hz or lower points_per_decade"
            )
        return self


class Rest(_Strict):
    rest: RestStep


class CCCV(_Strict):
    cccv: CCCVStep


class GITT(_Strict):
    gitt: GittStep


class Voltammetry(_Strict):
    cyclic_voltammetry: VoltammetryStep


class EIS(_Strict):
    eis: EisStep


class CC(_Strict):
    cc: CCStep


class CV(_Strict):
    cv: CVStep


class CP(_Strict):
    cp: CPStep


class Repeat(_Strict):
    """Repeat the steps; each repetition is one cycle (cycle numbers start at 1)."""

    repeat: int = Field(ge=1, le=100_000)
    steps: list[StepItem] = Field(min_length=1)


class CycleCondition(_Strict):
    """A condition on a completed cycle, from the agent's step statistics (no samples needed): ends a
    loop, or the whole run as the protocol's stop_when (PyBaMM's "80% capacity" termination)."""

    discharge_capacity_fraction_below: float | None = Field(
        None, gt=0, le=1, description="the cycle's discharge capacity over the first cycle's falls below this"
    )
    discharge_capacity_Ah_below: float | None = Field(None, gt=0)
    coulombic_efficiency_below: float | None = Field(
        None, gt=0, le=2, description="the cycle's CE, second direction over first (labtwin.analysis.cycles)"
    )
    cycles: int | None = Field(None, ge=1, description="this many cycles have run")

    @model_validator(mode="after")
    def _some(self) -> CycleCondition:
        if all(getattr(self, k) is None for k in type(self).model_fields):
            raise ValueError("give at least one of " + ", ".join(type(self).model_fields))
        return self


class LoopSettings(_Strict):
    until: CycleCondition = Field(
        description="checked after every iteration, on the latest cycle that went both ways (labtwin.analysis.cycles)"
    )
    max_cycles: int = Field(ge=1, le=1_000_000, description="the loop ends after this many iterations whatever happens")


class Loop(_Strict):
    """Repeat the steps until a cycle condition holds (e.g. capacity below 80 % of the first cycle's)."""

    loop: LoopSettings
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    steps: list[StepItem] = Field(min_length=1)


class Group(_Strict):
    """Named steps: a goto target and a heading in `protocol show`; runs its steps once."""

    group: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the group's name, also its tag")
    steps: list[StepItem] = Field(min_length=1)


def _step_from_string(value):
    """A PyBaMM-style sentence ("Discharge at C/10 until 1.0 V") becomes the mapping of its typed step."""
    if isinstance(value, str):
        try:
            return parse_step_string(value)
        except StepStringError as exc:
            raise ValueError(str(exc)) from None
    return value


STEP_KEYS = ("rest", "cc", "cp", "cv", "cccv", "gitt", "cyclic_voltammetry", "eis", "repeat", "loop", "group")


def _step_kind(value) -> str | None:
    """Which step a method entry is, from its one key: one clear error instead of one per kind it is not."""
    if isinstance(value, dict):
        keys = [k for k in STEP_KEYS if k in value]
        return keys[0] if len(keys) == 1 else None
    for key in STEP_KEYS:
        if hasattr(value, key):
            return key
    return None


StepItem = Annotated[
    Annotated[Rest, Tag("rest")]
    | Annotated[CC, Tag("cc")]
    | Annotated[CP, Tag("cp")]
    | Annotated[CV, Tag("cv")]
    | Annotated[CCCV, Tag("cccv")]
    | Annotated[GITT, Tag("gitt")]
    | Annotated[Voltammetry, Tag("cyclic_voltammetry")]
    | Annotated[EIS, Tag("eis")]
    | Annotated["Repeat", Tag("repeat")]
    | Annotated["Loop", Tag("loop")]
    | Annotated["Group", Tag("group")],
    Discriminator(
        _step_kind,
        custom_error_type="step_kind",
        custom_error_message="a step is a mapping with one of " + ", ".join(STEP_KEYS) + ", or a step sentence such as "
        "'Discharge at C/10 until 1.0 V'",
    ),
    BeforeValidator(
        _step_from_string,
        json_schema_input_type=Union[str, Rest, CC, CP, CV, CCCV, GITT, Voltammetry, EIS, "Repeat", "Loop", "Group"],
    ),
]
Repeat.model_rebuild()
Loop.model_rebuild()
Group.model_rebuild()


class Metadata(_Strict):
    name: str
    author: str = ""
    description: str = ""
    chemistry: str | None = Field(None, description="the cell chemistry this protocol is written for")
    nominal_capacity_Ah: float | None = Field(None, gt=0, description="required when c_rate is used without a cell")


class Record(_Strict):
    """When a sample is recorded: every interval_s, or sooner when the voltage or current has moved by
    voltage_change_V / current_change_A since the last recorded sample (then the agent reads the instrument
    every poll_interval_s and checks every reading against the limits, recording only what the rule keeps)."""

    interval_s: float = Field(
        1.0, gt=0, le=3600, description="longest time between recorded samples, seconds of cell time"
    )
    voltage_change_V: float | None = Field(None, gt=0, description="also record when V moved this much")
    current_change_A: float | None = Field(None, gt=0, description="also record when I moved this much")
    poll_interval_s: float | None = Field(
        None,
        gt=0,
        description="how often the agent reads the instrument (default: interval_s, or interval_s / 10 "
        "when a change rule is given)",
    )

    @model_validator(mode="after")
    def _poll_within_interval(self) -> Record:
        if self.poll_interval_s is not None and self.poll_interval_s > self.interval_s:
            raise ValueError(f"poll_interval_s {self.poll_interval_s:g} is longer than interval_s {self.interval_s:g}")
        return self

    def poll_s(self) -> float:
        if self.poll_interval_s is not None:
            return self.poll_interval_s
        changes = self.voltage_change_V is not None or self.current_change_A is not None
        return self.interval_s / 10 if changes else self.interval_s


class Protocol(_Strict):
    # Where it was read from, for compile errors to name the file and line (not part of the protocol's data).
    _source: str | None = PrivateAttr(None)
    _lines: dict[tuple, int] = PrivateAttr(default_factory=dict)

    metadata: Metadata
    record: Record = Field(default_factory=Record)
    safety: Limits
    anomalies: dict[AnomalyKind, Literal["notify", "pause", "stop"]] = Field(
        default_factory=dict,
        description="what the twin does when it finds each anomaly kind: notify (default), pause the run "
        "(open circuit until `labtwin resume`), or stop it safely",
    )
    method: list[StepItem] = Field(min_length=1)
    stop_when: CycleCondition | None = Field(
        None,
        description="experiment-level stop, checked after every cycle: e.g. {discharge_capacity_fraction_below: 0.8}",
    )

    @model_validator(mode="after")
    def _safety_needs_voltage_window(self) -> Protocol:
        if (self.safety.voltage_min_V is None or self.safety.voltage_max_V is None) and self.drives_the_cell():
            raise ValueError(
                "safety needs voltage_min_V and voltage_max_V: a protocol that drives current must bound "
                "the cell voltage (only a protocol of rest and eis steps may leave it to the channel)"
            )
        return self

    def drives_the_cell(self) -> bool:
        """Whether any step sources current or voltage beyond a small-signal EIS: such a protocol states its own
        voltage window; a check-up of rests and spectra runs inside whatever window its channel has."""

        def active(items) -> bool:
            for item in items:
                if isinstance(item, (Repeat, Loop, Group)):
                    if active(item.steps):
                        return True
                elif not isinstance(item, (Rest, EIS)):
                    return True
            return False

        return active(self.method)


class ProtocolError(ValueError):
    """A protocol file that cannot run; the message names the file, the field and what is allowed."""


UNION_TAGS = {"Rest", "CC", "CP", "CV", "CCCV", "GITT", "Voltammetry", "EIS", "Repeat", "Loop", "Group"}


def _path(loc: tuple) -> tuple:
    """The error's place in the file: the discriminator's tag (right after a list index, before the step's
    own key or a repeat's fields) and validator wrappers are noise to an author."""
    out: list = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
            continue
        if part in UNION_TAGS or str(part).startswith("function-"):
            continue
        following = loc[i + 1] if i + 1 < len(loc) else None
        is_tag = (
            i > 0
            and isinstance(loc[i - 1], int)
            and part in STEP_KEYS
            and (
                following == part
                or (part in ("repeat", "loop", "group") and following in ("steps", "repeat", "loop", "group", "tag"))
                or following is None
            )
        )
        if not is_tag:
            out.append(part)
    return tuple(out)


def _loc(loc: tuple) -> str:
    out = ""
    for part in _path(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(file)"


def yaml_lines(text: str) -> dict[tuple, int]:
    """Line (1-based) of every mapping key and list item in a YAML document, by its path (none if the text is not
    YAML the bounded reader accepts)."""
    try:
        return parse_yaml(text).lines
    except YamlError:
        return {}


def _line_of(path: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def format_validation_error(source: str, exc: ValidationError, lines: dict[tuple, int] | None = None) -> str:
    """One line per mistake, each naming the file (and its line where the YAML says), so a list of mistakes
    reads as a compiler's does and every line can be clicked to in an editor."""
    seen: set[str] = set()
    out: list[str] = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        line = _line_of(_path(tuple(err["loc"])), lines or {})
        err["msg"] = err["msg"].removeprefix("Value error, ")
        text = f"{source}:{line}: {where}: {err['msg']}" if line else f"{source}: {where}: {err['msg']}"
        if err.get("type") not in {"missing"} and "input" in err and not isinstance(err["input"], (dict, list)):
            text += f" (got {err['input']!r})"
        if text not in seen:
            seen.add(text)
            out.append(text)
    return "\n".join(out)


def parse_protocol(data: dict, source: str = "<protocol>", lines: dict[tuple, int] | None = None) -> Protocol:
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: a protocol is a mapping with metadata, safety and method sections")
    check_raw(data, source, lines or {})
    try:
        protocol = Protocol.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(format_validation_error(source, exc, lines)) from None
    except RecursionError:  # pragma: no cover - check_raw bounds the nesting first
        raise ProtocolError(f"{source}: method: nested too deeply to read") from None
    if source != "<protocol>":
        protocol._source = source
        protocol._lines = dict(lines or {})
    try:  # the loader bounds the expansion too, so no reader of the model (an export, say) expands it unbounded
        compiled_steps(protocol.method)
    except ProtocolError as exc:
        raise ProtocolError(in_file(protocol, str(exc)) if source != "<protocol>" else f"{source}: {exc}") from None
    return protocol


def check_raw(data: Any, source: str, lines: dict[tuple, int]) -> None:
    """Before pydantic sees the data: no non-finite number anywhere (the safety limits' model included) and
    repeats, loops and groups nested at most MAX_NESTING deep. Iterative, and visits each value once, so a
    mapping handed in from Python (not through the YAML reader, which bounds its own) costs its size, no more."""
    stack: list[tuple[Any, tuple, int]] = [(data, (), 0)]
    while stack:
        value, path, nesting = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError(_at(source, path, lines, f"{value} is not a finite number: give a finite value"))
        if isinstance(value, dict):
            for key, inner in value.items():
                here = (*path, key)
                deeper = nesting + 1 if key == "steps" and isinstance(inner, list) else nesting
                if deeper > MAX_NESTING:
                    raise ProtocolError(
                        _at(
                            source,
                            here,
                            lines,
                            f"repeats, loops and groups nest at most {MAX_NESTING} deep: flatten the inner ones",
                        )
                    )
                stack.append((inner, here, deeper))
        elif isinstance(value, list):
            stack.extend((inner, (*path, k), nesting) for k, inner in enumerate(value))


def _at(source: str, path: tuple, lines: dict[tuple, int], problem: str) -> str:
    line = _line_of(path, lines)
    return f"{source}:{line}: {dotted(path)}: {problem}" if line else f"{source}: {dotted(path)}: {problem}"


_FIELD = re.compile(r"^(method(?:\[\d+\]|\.[A-Za-z_]+)*)")


def in_file(protocol: Protocol, message: str) -> str:
    """A compile error as the loader's errors read: ``file:line: field: problem`` when the protocol came from a file."""
    source = protocol._source
    if source is None or message.startswith(source):
        return message
    match = _FIELD.match(message)
    line = None
    if match:
        path: list = []
        for part in re.findall(r"\[(\d+)\]|([A-Za-z_]+)", match.group(1)):
            path.append(int(part[0]) if part[0] else part[1])
        for n in range(len(path), 0, -1):
            if tuple(path[:n]) in protocol._lines:
                line = protocol._lines[tuple(path[:n])]
                break
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


def compiled_steps(method: list) -> int:
    """How many steps the method compiles to, every repeat expanded, computed without expanding it: refused above
    MAX_COMPILED_STEPS (repeat counts multiply: 100 000 x 100 000 is ten billion) or MAX_NESTING levels deep."""
    depth_stack: list[tuple[list, tuple, int]] = [(method, ("method",), 0)]
    while depth_stack:  # the depth first, without recursion, so the count below recurses at most MAX_NESTING deep
        items, path, depth = depth_stack.pop()
        if depth > MAX_NESTING:
            raise ProtocolError(
                f"{dotted(path)}: repeats, loops and groups nest at most {MAX_NESTING} deep: flatten the inner ones"
            )
        for k, item in enumerate(items):
            if isinstance(item, (Repeat, Loop, Group)):
                depth_stack.append((item.steps, (*path, k, "steps"), depth + 1))

    def count(items: list, path: tuple) -> int:
        total = 0
        for k, item in enumerate(items):
            here = (*path, k)
            if isinstance(item, Repeat):
                inner = count(item.steps, (*here, "steps"))
                n = item.repeat * inner
                if n > MAX_COMPILED_STEPS:
                    raise ProtocolError(
                        f"{dotted(here)}.repeat: {item.repeat} repetitions of {inner} step(s) is {n} steps, more "
                        f"than the {MAX_COMPILED_STEPS} a protocol compiles to: use a loop (its steps are listed "
                        "once and run as it goes) or fewer repetitions"
                    )
            elif isinstance(item, (Loop, Group)):
                n = count(item.steps, (*here, "steps"))
            elif isinstance(item, Voltammetry):
                sweep = item.cyclic_voltammetry
                rates = sweep.scan_rate_V_s if isinstance(sweep.scan_rate_V_s, list) else [sweep.scan_rate_V_s]
                n = len(rates) * (2 if sweep.hold_start_s > 0 else 1)
            else:
                n = 1
            total += n
            if total > MAX_COMPILED_STEPS:
                raise ProtocolError(
                    f"{dotted(here)}: the method compiles to more than {MAX_COMPILED_STEPS} steps here: use a loop "
                    "(its steps are listed once and run as it goes) or fewer repetitions"
                )
        return total

    return count(method, ("method",))


LIBRARY = Path(__file__).parent / "library"


def resolve_protocol_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a protocol in labtwin/protocols/library/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (LIBRARY / f"{name_or_path}", LIBRARY / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    names = ", ".join(sorted(p.stem for p in LIBRARY.glob("*.yaml")))
    raise ProtocolError(f"no protocol file {str(name_or_path)!r}: give a path or one of the library's: {names}")


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A protocol file read by the bounded YAML reader (labtwin.protocols.safe_yaml) and validated: every refusal
    is a ProtocolError of one line per mistake naming the file, line and field."""
    path = resolve_protocol_path(name_or_path)
    try:
        document = read_yaml_file(path, "a protocol file")
    except YamlError as exc:
        raise ProtocolError(str(exc)) from None
    return parse_protocol(document.data, str(path), document.lines)
