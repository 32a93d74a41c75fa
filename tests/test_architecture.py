"""The import contracts cover every room of labtwin, including ones added after the contracts were written.

The layers contract is exhaustive (import-linter fails on a sub-package it does not place); the Prefect contract
lists its source rooms by hand, so this test keeps that list equal to "every room but orchestration".
"""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rooms() -> set[str]:
    return {f"labtwin.{p.name}" for p in (REPO / "labtwin").iterdir() if (p / "__init__.py").exists()}


def _contracts() -> list[dict]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_room_but_orchestration_is_forbidden_prefect():
    (prefect,) = [c for c in _contracts() if c.get("forbidden_modules") == ["prefect"]]
    assert set(prefect["source_modules"]) == _rooms() - {"labtwin.orchestration"}


def test_the_layers_contract_places_every_room_once():
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    placed = [f"labtwin.{name.strip()}" for layer in layers["layers"] for name in layer.split("|")]
    assert layers.get("exhaustive") is True
    assert sorted(placed) == sorted(_rooms())


def test_the_lab_files_driver_names_are_the_drivers_the_cli_builds():
    from labtwin.cli.wiring import REAL_DRIVERS
    from labtwin.config.lab import DRIVERS

    assert set(DRIVERS) == {"simulated", *REAL_DRIVERS}
