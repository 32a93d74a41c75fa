"""The library of simulated cells: YAML parameter files, each value with its unit and source.

A cell file is data, not code (PyBaMM's way): the model in labtwin.physics knows
no numbers. Every parameter must name where it comes from (a seed file and
figure, a cited paper, or "assumed"/"fitted so that ..."): a file that leaves
one out is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labtwin.physics.cell import CellParameters, PhysicsCell
from labtwin.physics.ecm import EcmCell, EcmParameters

CELL_DIR = Path(__file__).parent / "cells"


class CellFileError(ValueError):
    pass


class CellDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    chemistry: str
    seed: str | None = None
    nominal_capacity_Ah: float = Field(gt=0)
    voltage_window_V: tuple[float, float]
    model: Literal["ecm", "physics"] = "ecm"
    parameters: EcmParameters | CellParameters
    sources: dict[str, str]
    voltage_noise_V: float = Field(0.0, ge=0)
    current_noise_A: float = Field(0.0, ge=0)
    impedance_noise_relative: float = Field(0.0, ge=0, description="standard deviation of EIS points relative to |Z|")
    eis_circuit: str = Field(
        "R0-p(R1,CPE1)-W1",
        description="equivalent circuit the twin fits to this cell's spectra (impedance.py convention)",
    )
    aliases: list[str] = Field(default_factory=list, description="other names --sim accepts")

    @model_validator(mode="before")
    @classmethod
    def _parameters_by_model(cls, data):
        if isinstance(data, dict) and isinstance(data.get("parameters"), dict):
            kind = CellParameters if data.get("model") == "physics" else EcmParameters
            data = {**data, "parameters": kind.model_validate(data["parameters"])}
        return data

    @model_validator(mode="after")
    def _every_parameter_has_a_source(self) -> CellDefinition:
        missing = [leaf for leaf in _leaves(self.parameters) if not _has_source(leaf, self.sources)]
        if missing:
            raise ValueError(
                f"parameters without a source: {', '.join(missing)} (add them, or a parent section, under 'sources:')"
            )
        return self

    def build_model(self) -> PhysicsCell | EcmCell:
        """A fresh simulated cell in its as-assembled state."""
        if isinstance(self.parameters, CellParameters):
            return PhysicsCell(self.parameters, self.nominal_capacity_Ah)
        return EcmCell(self.parameters, self.nominal_capacity_Ah)


def _leaves(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of every value the file set (list items by index)."""
    out: list[str] = []
    for name in model.model_fields_set:
        if name == "kind":
            continue  # a model's kind is structure, not a measured value
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out += _leaves(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for k, item in enumerate(value):
                out += _leaves(item, f"{path}[{k}].")
        else:
            out.append(path)
    return out


def _has_source(leaf: str, sources: dict[str, str]) -> bool:
    """A source on the leaf or on any section above it covers it (``positive.ocp`` covers its fields)."""
    path = leaf
    while True:
        if path in sources:
            return True
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return False
        path = path[:cut]


def available_cells() -> list[str]:
    return sorted(p.stem for p in CELL_DIR.glob("*.yaml"))


def _by_alias(name: str) -> Path | None:
    for path in CELL_DIR.glob("*.yaml"):
        try:
            head = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        if name in (head.get("aliases") or []) or head.get("name") == name:
            return path
    return None


def load_cell(name_or_path: str | Path) -> CellDefinition:
    """A cell by library name (labtwin/physics/cells/<name>.yaml, or a name/alias inside one) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CELL_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            path = _by_alias(str(name_or_path)) or path
    if not path.exists():
        raise CellFileError(
            f"no simulated cell {str(name_or_path)!r}: choose one of {', '.join(available_cells())} or give a YAML path"
        )
    try:
        raw = yaml.safe_load(path.read_text())
        return CellDefinition.model_validate(raw)
    except yaml.YAMLError as exc:
        raise CellFileError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}"
            + ("" if isinstance(e.get("input"), (dict, list)) else f" (got {e.get('input')!r})")
            for e in exc.errors()
        ]
        raise CellFileError("\n".join(lines)) from None
