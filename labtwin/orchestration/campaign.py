"""Campaigns: cells, the protocols each must run, on which channels, in which order; run, queued, resumable.

A campaign file::

    campaign: formation-batch-07
    cells:
      - id: LCO-017
        chemistry: LCO|LGPS|Li-In
        nominal_capacity_Ah: 1.02e-3
        channels: [ch2]                # the channel, or a pool it may use
        protocols: [lco_formation, seed003-gitt]
        priority: 10                   # higher runs first where channels are shared
    schedule:                          # optional, for `labtwin campaign serve`
      - protocol: eis-checkup
        cells: [LCO-017]
        every: 24h                     # or cron: "0 6 * * *"

Each (cell, protocol) is a job with a run id fixed by the campaign
(``<campaign>-<cell>-<n>-<protocol>``): running the campaign again finds every
job's record in the store, skips what finished, resumes what was
interrupted, and starts what never ran. A channel runs one job at a time:
jobs queue in priority order per channel in this process, and across
processes a job waits until the channel's agent is idle (campaign_flow.py
says why the agent, not a Prefect concurrency limit, is the lease).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labtwin.protocols.model import ProtocolError, format_validation_error, resolve_protocol_path
from labtwin.protocols.safe_yaml import YamlError, read_yaml_file

INTERVAL_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CampaignCell(_Strict):
    id: str = Field(min_length=1, description="the physical cell's identity; travels in every run document")
    chemistry: str | None = None
    nominal_capacity_Ah: float | None = Field(None, gt=0, description="for C-rates (else the channel's cell)")
    channels: list[str] = Field(min_length=1, description="the channel, or the pool of channels it may use")
    protocols: list[str] = Field(min_length=1, description="protocol files or library names, run in this order")
    priority: int = Field(0, description="higher first where channels are shared")

    @field_validator("protocols")
    @classmethod
    def _protocols_exist(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                resolve_protocol_path(name)
            except ProtocolError as exc:
                raise ValueError(str(exc)) from None
        return value


class ScheduleEntry(_Strict):
    protocol: str
    cells: list[str] = Field(min_length=1)
    every: str | None = Field(None, description="interval: 30m, 6h, 1d")
    cron: str | None = Field(None, description="cron expression, e.g. '0 6 * * *'")

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleEntry:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of every (e.g. 24h) or cron")
        if self.every is not None:
            interval_s(self.every)
        return self


class Campaign(_Strict):
    campaign: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="name; part of every run id")
    lab: str | None = Field(None, description="lab file (default: LABTWIN_LAB or the packaged one)")
    cells: list[CampaignCell] = Field(min_length=1)
    schedule: list[ScheduleEntry] = Field(default_factory=list)
    max_parallel_runs: int | None = Field(
        None,
        ge=1,
        description="runs in progress at once (default: one per channel; 16 on Prefect's ephemeral "
        "SQLite API, which locks under more)",
    )

    @model_validator(mode="after")
    def _unique_cells_and_known_schedule(self) -> Campaign:
        ids = [c.id for c in self.cells]
        if len(ids) != len(set(ids)):
            raise ValueError(f"cell ids must be unique: {sorted(i for i in ids if ids.count(i) > 1)}")
        for entry in self.schedule:
            unknown = set(entry.cells) - set(ids)
            if unknown:
                raise ValueError(f"schedule names cells that are not in cells: {sorted(unknown)}")
        return self


def interval_s(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not an interval: write e.g. 30m, 6h, 1d")
    return float(match.group(1)) * INTERVAL_UNITS[match.group(2)]


def load_campaign(path: str | Path) -> Campaign:
    path = Path(path)
    if not path.exists():
        raise ProtocolError(f"campaign file {path} does not exist")
    try:  # the bounded reader: size, aliases, nesting, duplicate keys, finite numbers (issue 14)
        document = read_yaml_file(path, "a campaign file")
    except YamlError as exc:
        raise ProtocolError(str(exc)) from None
    try:
        return Campaign.model_validate(document.data)
    except ValidationError as exc:
        raise ProtocolError(format_validation_error(str(path), exc, document.lines)) from None


@dataclass(frozen=True)
class Job:
    run_id: str
    cell: CampaignCell
    protocol: str
    channel: str
    order: int


def plan(campaign: Campaign) -> list[Job]:
    """Every job, in the order it starts: by priority, then as written; each on a channel of its cell's pool
    (the one with the least work queued, so a pool spreads its cells), deterministic so a rerun maps the same."""
    queued: dict[str, int] = {}
    jobs = []
    ordered = sorted(enumerate(campaign.cells), key=lambda kv: (-kv[1].priority, kv[0]))
    for order, (_, cell) in enumerate(ordered):
        channel = min(cell.channels, key=lambda ch: (queued.get(ch, 0), cell.channels.index(ch)))
        for k, protocol in enumerate(cell.protocols):
            queued[channel] = queued.get(channel, 0) + 1
            jobs.append(
                Job(
                    f"{campaign.campaign}-{cell.id}-{k + 1}-{protocol_stem(protocol)}",
                    cell,
                    protocol,
                    channel,
                    order * 1000 + k,
                )
            )
    return jobs


def protocol_stem(protocol: str) -> str:
    """The protocol's name in run ids: "demo-lto-0.1C" keeps its ".1C" (Path.stem would cut it)."""
    name = Path(protocol).name
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def channels_of(campaign: Campaign) -> list[str]:
    return sorted({ch for cell in campaign.cells for ch in cell.channels})
