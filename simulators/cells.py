"""The library of simulated cells: YAML parameter files, each value with its unit and source.

A cell file is data, not code (PyBaMM's way): the model in labtwin.sim knows
no numbers. Every parameter must name where it comes from (a seed file and
figure, a cited paper, or "assumed"/"fitted so that ..."): a file that leaves
one out is refused.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labtwin.sim.ecm import EcmParameters

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
    model: str = "ecm"
    parameters: EcmParameters
    sources: dict[str, str]
    voltage_noise_V: float = Field(0.0, ge=0)
    current_noise_A: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _every_parameter_has_a_source(self) -> "CellDefinition":
        given = set(self.parameters.model_fields_set)
        missing = sorted(given - set(self.sources))
        if missing:
            raise ValueError(f"parameters without a source: {', '.join(missing)} (add them under 'sources:')")
        return self


def available_cells() -> list[str]:
    return sorted(p.stem for p in CELL_DIR.glob("*.yaml"))


def load_cell(name_or_path: str | Path) -> CellDefinition:
    """A cell by library name (simulators/cells/<name>.yaml) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CELL_DIR / f"{name_or_path}.yaml"
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
            f"{path}: {'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        raise CellFileError("\n".join(lines)) from None
