"""What the twin publishes: a cell's state (retained) and its anomalies.

Topics: labtwin/v1/<lab>/cells/<cell>/state and .../anomaly. ``kind`` of an
anomaly names what was found (``oscillation_onset``, ``impedance_growth``,
...), so ``replay --json`` and a subscriber read the same shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import ConfigDict, Field

from labtwin.documents.base import SCHEMA_VERSION, Finite, StoreInt, utc_now

AnomalyKind = Literal[
    "oscillation_onset",
    "impedance_growth",
    "capacity_fade",
    "knee_onset",
    "low_first_cycle_ce",
    "ce_change",
    "soft_short",
    "voltage_drop",
    "polarization_growth",
    "twin_residual",
]
Action = Literal["notify", "pause", "stop"]


class Anomaly(Finite):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = SCHEMA_VERSION
    kind: AnomalyKind
    cell: str
    lab: str = ""
    channel: str = ""
    run_id: str = ""
    time_s: float = Field(description="test time at the onset (cell time since the run started)")
    detected_time_s: float | None = Field(None, description="test time of the sample that completed the evidence")
    cycle: StoreInt | None = None
    step: StoreInt | None = None
    message: str
    figures: dict[str, float] = Field(
        default_factory=dict, description="the detector's numbers, with units in the keys"
    )
    action: Action = "notify"
    wall_time: datetime = Field(default_factory=utc_now)


class CellState(Finite):
    """The twin's current view of one cell, retained on its state topic."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = SCHEMA_VERSION
    cell: str
    lab: str = ""
    channel: str = ""
    run_id: str = ""
    model: str = Field("", description="the cell definition the twin runs in the loop")
    time_s: float = 0.0
    cycle: StoreInt = 0
    step: StoreInt | None = None
    soc: float | None = Field(None, description="state of charge from the model in the loop, 0..1 of nominal")
    voltage_V: float | None = None
    predicted_voltage_V: float | None = None
    residual_V: float | None = None
    residual_sigma_V: float | None = None
    series_resistance_ohm: float | None = Field(None, description="R0 by recursive least squares on the live data")
    rc_resistance_ohm: float | None = None
    rc_time_constant_s: float | None = None
    capacity_Ah: float | None = Field(None, description="discharge capacity of the last full cycle")
    capacity_retention: float | None = None
    coulombic_efficiency: float | None = None
    impedance_ohm: dict[str, float] = Field(default_factory=dict, description="resistances of the last EIS fit")
    predicted_step_end_s: float | None = Field(None, description="test time the current step is predicted to end")
    anomalies: StoreInt = 0
    wall_time: datetime = Field(default_factory=utc_now)
