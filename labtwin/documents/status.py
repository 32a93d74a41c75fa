"""Agent -> all, retained on .../status: what a channel is doing now."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import Field

from labtwin.documents.base import Document, MaybeReading, StoreInt, utc_now
from labtwin.documents.limits import Limits


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
    step_index: StoreInt | None = None
    label: str | None = None
    cycle: StoreInt | None = None
    voltage_V: MaybeReading = None
    current_A: MaybeReading = None
    temperature_C: MaybeReading = None
    message: str = ""
    limits: Limits | None = Field(None, description="the channel's own safety limits, enforced by its agent")
    nominal_capacity_Ah: float | None = Field(None, description="of the cell on this channel, for C-rates")
