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

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labtwin.models import Limits
from labtwin.twin.documents import AnomalyKind


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Until(_Strict):
    """End conditions of a step. ``voltage_V`` on a cc step is reached in the current's direction;
    ``current_A``/``c_rate`` on a cv step is the magnitude the current decays to."""

    time_s: float | None = Field(None, gt=0, description="step duration limit, seconds of cell time")
    voltage_V: float | None = Field(None, gt=0)
    current_A: float | None = Field(None, gt=0)
    c_rate: float | None = Field(None, gt=0, description="current threshold as a C-rate (cv steps)")
    capacity_Ah: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_current(self) -> "Until":
        if self.current_A is not None and self.c_rate is not None:
            raise ValueError("give either current_A or c_rate, not both")
        return self


class RestStep(_Strict):
    duration_s: float = Field(gt=0, description="how long to rest at open circuit")
    label: str = ""


class CCStep(_Strict):
    """Constant current. Positive charges; negative discharges."""

    current_A: float | None = None
    c_rate: float | None = Field(None, description="current as a multiple of nominal capacity per hour")
    until: Until
    label: str = ""

    @model_validator(mode="after")
    def _setpoint(self) -> "CCStep":
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a cc step needs exactly one of current_A or c_rate (negative discharges)")
        if (self.current_A or self.c_rate) == 0:
            raise ValueError("a cc step with zero current is a rest: use rest")
        if self.until.voltage_V is None and self.until.time_s is None and self.until.capacity_Ah is None:
            raise ValueError("a cc step needs until.voltage_V, until.time_s or until.capacity_Ah")
        if self.until.current_A is not None or self.until.c_rate is not None:
            raise ValueError("until.current_A / until.c_rate end cv steps, not cc steps")
        return self


class CVStep(_Strict):
    """Constant voltage hold."""

    voltage_V: float = Field(gt=0)
    until: Until
    label: str = ""

    @model_validator(mode="after")
    def _ends(self) -> "CVStep":
        if self.until.current_A is None and self.until.c_rate is None and self.until.time_s is None:
            raise ValueError("a cv step needs until.current_A, until.c_rate or until.time_s")
        if self.until.voltage_V is not None:
            raise ValueError("until.voltage_V ends cc steps; a cv step holds its voltage")
        return self


class CCCVStep(_Strict):
    """Constant current to voltage_V, then hold voltage_V until the current tapers to until.current_A / c_rate."""

    current_A: float | None = None
    c_rate: float | None = None
    voltage_V: float = Field(gt=0)
    until: Until
    label: str = ""

    @model_validator(mode="after")
    def _setpoint(self) -> "CCCVStep":
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a cccv step needs exactly one of current_A or c_rate")
        if self.until.current_A is None and self.until.c_rate is None and self.until.time_s is None:
            raise ValueError("a cccv step needs until.current_A, until.c_rate or until.time_s")
        return self


class GittStep(_Strict):
    """Galvanostatic intermittent titration: pulses of current_A / c_rate for pulse_s, each followed by
    relax_s at open circuit, until a pulse ends beyond until_voltage_V."""

    current_A: float | None = None
    c_rate: float | None = None
    pulse_s: float = Field(gt=0)
    relax_s: float = Field(gt=0)
    until_voltage_V: float = Field(gt=0)
    max_pulses: int = Field(1000, ge=1)
    label: str = ""

    @model_validator(mode="after")
    def _setpoint(self) -> "GittStep":
        if (self.current_A is None) == (self.c_rate is None):
            raise ValueError("a gitt step needs exactly one of current_A or c_rate (negative discharges)")
        return self


class VoltammetryStep(_Strict):
    """Cyclic voltammetry: sweeps start -> vertex_1 -> vertex_2 (-> vertex_1 ...) at each scan rate in turn."""

    start_V: float
    vertex_1_V: float
    vertex_2_V: float
    scan_rate_V_s: float | list[float] = Field(description="one rate, or a list: one step per rate")
    cycles: int = Field(1, ge=1)
    step_V: float = Field(0.001, gt=0)
    hold_start_s: float = Field(
        0.0, ge=0, description="hold start_V this long before each sweep, so every rate starts from an equilibrated film"
    )
    label: str = ""


class EisStep(_Strict):
    """Impedance spectrum around open circuit."""

    mode: Literal["potentiostatic", "galvanostatic"] = "potentiostatic"
    f_start_Hz: float = Field(1e5, gt=0)
    f_end_Hz: float = Field(0.1, gt=0)
    points_per_decade: int = Field(10, ge=1)
    amplitude: float = Field(0.005, gt=0, description="V (potentiostatic) or A (galvanostatic)")
    label: str = ""


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


class Repeat(_Strict):
    """Repeat the steps; each repetition is one cycle (cycle numbers start at 1)."""

    repeat: int = Field(ge=1, le=100_000)
    steps: list["StepItem"] = Field(min_length=1)


StepItem = Annotated[Union[Rest, CC, CV, CCCV, GITT, Voltammetry, EIS, Repeat], Field(union_mode="left_to_right")]
Repeat.model_rebuild()


class Metadata(_Strict):
    name: str
    author: str = ""
    description: str = ""
    chemistry: str | None = Field(None, description="the cell chemistry this protocol is written for")
    nominal_capacity_Ah: float | None = Field(None, gt=0, description="required when c_rate is used without a cell")


class Record(_Strict):
    interval_s: float = Field(1.0, gt=0, le=3600, description="sampling interval, seconds of cell time")


class Protocol(_Strict):
    metadata: Metadata
    record: Record = Field(default_factory=Record)
    safety: Limits
    anomalies: dict[AnomalyKind, Literal["notify", "pause", "stop"]] = Field(
        default_factory=dict,
        description="what the twin does when it finds each anomaly kind: notify (default), pause the run "
        "(open circuit until `labtwin resume`), or stop it safely",
    )
    method: list[StepItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _safety_needs_voltage_window(self) -> "Protocol":
        if self.safety.voltage_min_V is None or self.safety.voltage_max_V is None:
            raise ValueError("safety needs voltage_min_V and voltage_max_V: a protocol must bound the cell voltage")
        return self


class ProtocolError(ValueError):
    """A protocol file that cannot run; the message names the file, the field and what is allowed."""


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"Rest", "CC", "CV", "CCCV", "GITT", "Voltammetry", "EIS", "Repeat"}:
            continue  # union member names are noise to a protocol author
        else:
            out += f".{part}" if out else str(part)
    return out or "(file)"


def format_validation_error(source: str, exc: ValidationError) -> str:
    seen: set[str] = set()
    lines = [f"{source}: not a valid protocol:"]
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        text = f"  {where}: {err['msg']}"
        if err.get("type") not in {"missing"} and "input" in err and not isinstance(err["input"], (dict, list)):
            text += f" (got {err['input']!r})"
        if text not in seen:
            seen.add(text)
            lines.append(text)
    return "\n".join(lines)


def parse_protocol(data: dict, source: str = "<protocol>") -> Protocol:
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: a protocol is a mapping with metadata, safety and method sections")
    try:
        return Protocol.model_validate(data)
    except ValidationError as exc:
        raise ProtocolError(format_validation_error(source, exc)) from None


LIBRARY = Path(__file__).parent / "library"


def resolve_protocol_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a protocol in protocols/library/ (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    for candidate in (LIBRARY / f"{name_or_path}", LIBRARY / f"{name_or_path}.yaml"):
        if candidate.exists():
            return candidate
    names = ", ".join(sorted(p.stem for p in LIBRARY.glob("*.yaml")))
    raise ProtocolError(f"no protocol file {str(name_or_path)!r}: give a path or one of the library's: {names}")


def load_protocol(name_or_path: str | Path) -> Protocol:
    path = resolve_protocol_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{path}: not valid YAML: {exc}") from None
    return parse_protocol(data, str(path))
