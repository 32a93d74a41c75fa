"""The live half of the dashboard: one bus subscription, the latest state of every channel, fan-out to browsers.

The dashboard is one more viewer on the bus (like ``labtwin monitor``): retained status and twin states give
every channel's state the moment it connects, sample batches move the tiles and the open run pages, events and
anomalies go to the timeline. Browsers never talk MQTT; each gets a bounded queue of updates. A browser that
stops reading loses its oldest updates and is told to reload what it missed, so one slow tab never holds the
bus back.

The broker may be down when the dashboard starts, or restart while it runs: the subscription is retried for
as long as the dashboard runs, and every page shows whether the bus is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from labtwin.bus import ROOT, BrokerUnreachable, Bus
from labtwin.documents import (
    Anomaly,
    CellState,
    ChannelState,
    ChannelStatus,
    Outage,
    RunStart,
    RunStop,
    SampleBatch,
    SecurityEvent,
    StepEvent,
)
from labtwin.security import BrokerConnection, as_identity

log = logging.getLogger(__name__)

LIVE_POINTS_PER_RUN = 20_000  # the newest samples of each run, for a run page opened while it runs
EVENTS_KEPT = 200
RUNS_KEPT = 256  # runs whose RunStart and newest samples are kept


class Tile(BaseModel):
    """One channel as the Lab page shows it."""

    lab: str
    channel: str
    state: str = "unknown"
    message: str = ""
    cell_id: str | None = None
    run_id: str | None = None
    last_run_id: str | None = Field(None, description="the channel's latest run, kept once it ends")
    protocol: str | None = None
    step_index: int | None = None
    label: str | None = None
    cycle: int | None = None
    voltage_V: float | None = None
    current_A: float | None = None
    temperature_C: float | None = None
    cell_time_s: float | None = None
    soc: float | None = None
    time_to_step_end_s: float | None = None
    last_anomaly: str | None = None
    sample_received_ms: float | None = None  # wall clock (ms since epoch) the sample arrived
    updated_ms: float = 0.0


@dataclass(eq=False)
class Listener:
    """One browser's stream: a bounded queue; ``run_id`` also sends that run's new samples."""

    run_id: str | None = None
    lab: str | None = None
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(maxsize=2000))
    overflowed: bool = False

    def offer(self, update: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(update)
        except asyncio.QueueFull:
            self.overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait({"kind": "resync"})


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class LiveLab:
    """Subscribes for the dashboard and keeps what the pages need now."""

    def __init__(self, broker: str | BrokerConnection, lab: str = "+") -> None:
        self.connection = as_identity(broker, "viewer")
        self.lab = lab
        self.tiles: dict[tuple[str, str], Tile] = {}
        self.runs: dict[str, RunStart] = {}
        self.points: dict[str, deque[tuple[float, float | None, float | None]]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS_KEPT)
        self.listeners: set[Listener] = set()
        self.broker_state = "connecting"
        self.broker_detail = ""
        self.bad_documents = 0
        # Called with (lab, document) for every document but samples: the alert rules, shown as events.
        self.on_document: Callable[[str, BaseModel], object] | None = None
        self._task: asyncio.Task[None] | None = None
        self._bus: Bus | None = None
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dashboard-live")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def filters(self) -> list[str]:
        base = f"{ROOT}/{self.lab}"
        return [
            f"{base}/+/status",
            f"{base}/+/event",
            f"{base}/+/data",
            f"{base}/cells/+/state",
            f"{base}/cells/+/anomaly",
        ]

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with Bus(self.connection, connect_timeout_s=5.0) as bus:
                    self._bus = bus
                    sub = await bus.subscribe(self.filters())
                    watcher = asyncio.create_task(self._watch_connection(bus))
                    try:
                        while True:
                            message = await sub.get()
                            self.take(message.topic, message.document)
                    finally:
                        watcher.cancel()
            except asyncio.CancelledError:
                raise
            except BrokerUnreachable as exc:
                self._set_broker("unreachable", str(exc))
            except Exception as exc:  # the live view must outlive anything the bus throws
                self._set_broker("unreachable", f"{type(exc).__name__}: {exc}")
                log.error("dashboard: bus subscription failed: %s: %s", type(exc).__name__, exc)
            finally:
                self._bus = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 2.0)

    async def _watch_connection(self, bus: Bus) -> None:
        while True:
            self._set_broker("live" if bus.connected else "reconnecting", str(bus.address))
            await asyncio.sleep(0.5)

    def _set_broker(self, state: str, detail: str) -> None:
        if (state, detail) != (self.broker_state, self.broker_detail):
            self.broker_state, self.broker_detail = state, detail
            self._broadcast({"kind": "broker", "state": state, "detail": detail})

    # ------------------------------------------------------------------ fan-out

    def listen(self, run_id: str | None = None, lab: str | None = None) -> Listener:
        listener = Listener(run_id=run_id, lab=lab)
        self.listeners.add(listener)
        return listener

    def forget(self, listener: Listener) -> None:
        self.listeners.discard(listener)

    def _broadcast(self, update: dict[str, Any], lab: str | None = None, run_id: str | None = None) -> None:
        for listener in list(self.listeners):
            if listener.lab and lab and listener.lab != lab:
                continue
            if update["kind"] == "points" and listener.run_id != run_id:
                continue
            listener.offer(update)

    # ------------------------------------------------------------------ documents

    def take(self, topic: str, doc: BaseModel) -> None:
        """One bus document into the view; one the view cannot take is logged and counted, never fatal."""
        try:
            self._absorb(topic, doc)
            parts = topic.split("/")
            if self.on_document is not None and not isinstance(doc, SampleBatch) and len(parts) > 2:
                self.on_document(parts[2], doc)
        except Exception as exc:
            self.bad_documents += 1
            log.error("dashboard: %s on %s skipped: %s: %s", type(doc).__name__, topic, type(exc).__name__, exc)

    def _tile(self, lab: str, channel: str) -> Tile:
        key = (lab, channel)
        if key not in self.tiles:
            self.tiles[key] = Tile(lab=lab, channel=channel)
        return self.tiles[key]

    def _changed(self, tile: Tile) -> None:
        tile.updated_ms = time.time() * 1e3
        self._broadcast({"kind": "tile", "tile": tile.model_dump()}, lab=tile.lab)

    def note(self, lab: str, run_id: str | None, time_s: float | None, kind: str, text: str) -> None:
        """An event on the Lab page's list: the bus's (step ends, anomalies, ...) and the dashboard's own
        (operator actions, alerts)."""
        event = {
            "lab": lab,
            "run_id": run_id,
            "time_s": time_s,
            "kind": kind,
            "text": text,
            "wall_ms": time.time() * 1e3,
        }
        self.events.append(event)
        self._broadcast({"kind": "event", "event": event}, lab=lab)

    def _absorb(self, topic: str, doc: BaseModel) -> None:
        parts = topic.split("/")
        if len(parts) < 5:
            return
        lab = parts[2]
        if isinstance(doc, SampleBatch):
            self._samples(lab, doc)
        elif isinstance(doc, ChannelStatus):
            tile = self._tile(lab, doc.channel)
            tile.state = doc.state.value
            tile.message = doc.message
            tile.cell_id = doc.cell_id
            if doc.run_id and doc.run_id != tile.run_id:
                tile.protocol = self.runs[doc.run_id].protocol if doc.run_id in self.runs else None
            if doc.state is not ChannelState.running:
                tile.time_to_step_end_s = None
            tile.run_id = doc.run_id
            tile.last_run_id = doc.run_id or tile.last_run_id
            tile.step_index, tile.label, tile.cycle = doc.step_index, doc.label, doc.cycle
            if doc.state is not ChannelState.offline:
                tile.voltage_V = _finite(doc.voltage_V)
                tile.current_A = _finite(doc.current_A)
                tile.temperature_C = _finite(doc.temperature_C)
            self._changed(tile)
        elif isinstance(doc, RunStart):
            self.runs[doc.run_id] = doc
            while len(self.runs) > RUNS_KEPT:  # a dashboard lives for months: the newest runs are enough
                del self.runs[next(iter(self.runs))]
            tile = self._tile(lab, doc.channel)
            tile.run_id, tile.protocol, tile.cell_id = doc.run_id, doc.protocol, doc.cell_id
            tile.last_run_id = doc.run_id
            tile.last_anomaly = None
            self._changed(tile)
            self.note(lab, doc.run_id, 0.0, "run_start", f"{doc.channel}: run started, {doc.protocol} on {doc.cell_id}")
        elif isinstance(doc, RunStop):
            self.note(
                lab,
                doc.run_id,
                doc.cell_time_s,
                "run_stop",
                f"{doc.channel}: run {doc.exit_status} {doc.reason}".strip(),
            )
        elif isinstance(doc, StepEvent):
            tile = self._tile(lab, doc.channel)
            if doc.event == "started":
                tile.step_index, tile.label, tile.cycle = doc.step_index, doc.label, doc.cycle
                self._changed(tile)
            else:
                r = doc.reason
                why = f" ({r.kind}:{r.name})" if r is not None else ""
                self.note(
                    lab,
                    doc.run_id,
                    doc.time_s,
                    "step_end",
                    f"{doc.channel}: step {doc.step_index} {doc.label} ended{why}",
                )
        elif isinstance(doc, CellState):
            for tile in self.tiles.values():
                # The run the tile shows, or, once the channel is idle, the one it last ran: the twin's last
                # state of a finished run (its SOC at the end) arrives after the idle status (was dropped, and
                # the tile kept the SOC from mid-run: 91 % on a cell just discharged to 2.0 V).
                current = tile.run_id or tile.last_run_id
                if tile.lab == lab and tile.cell_id == doc.cell and (not doc.run_id or doc.run_id == current):
                    tile.soc = _finite(doc.soc)
                    end = _finite(doc.predicted_step_end_s)
                    running = tile.run_id is not None and tile.state == ChannelState.running.value
                    tile.time_to_step_end_s = max(end - doc.time_s, 0.0) if end is not None and running else None
                    self._changed(tile)
            if doc.run_id and doc.predicted_voltage_V is not None:
                self._broadcast(
                    {
                        "kind": "twin",
                        "run_id": doc.run_id,
                        "time_s": doc.time_s,
                        "predicted_V": doc.predicted_voltage_V,
                    },
                    lab=lab,
                )
        elif isinstance(doc, Anomaly):
            for tile in self.tiles.values():
                if tile.lab == lab and (tile.run_id == doc.run_id or (not doc.run_id and tile.cell_id == doc.cell)):
                    tile.last_anomaly = f"{doc.kind} (cycle {doc.cycle})" if doc.cycle is not None else str(doc.kind)
                    self._changed(tile)
            self.note(lab, doc.run_id or None, doc.time_s, "anomaly", f"{doc.cell}: {doc.kind}: {doc.message}")
        elif isinstance(doc, Outage):
            self.note(
                lab,
                doc.run_id,
                doc.from_time_s,
                "outage",
                f"{doc.channel}: no agent for {doc.span_s:.0f} s of cell time",
            )
        elif isinstance(doc, SecurityEvent):
            self.note(
                lab,
                None,
                None,
                "security",
                f"{doc.channel}: refused a command from {doc.sender or 'an unsigned sender'}: {doc.reason}",
            )

    def _samples(self, lab: str, batch: SampleBatch) -> None:
        n = len(batch.time_s)
        if n == 0:
            return
        tile = self._tile(lab, batch.channel)
        tile.run_id = tile.last_run_id = batch.run_id
        tile.voltage_V = _finite(batch.voltage_V[-1])
        tile.current_A = _finite(batch.current_A[-1])
        tile.temperature_C = _finite(batch.temperature_C[-1])
        tile.cell_time_s = batch.time_s[-1]
        tile.step_index, tile.cycle = batch.step[-1], batch.cycle[-1]
        tile.sample_received_ms = time.time() * 1e3
        if tile.state in ("unknown", "idle", "offline"):
            tile.state = "running"
        self._changed(tile)
        buffer = self.points.setdefault(batch.run_id, deque(maxlen=LIVE_POINTS_PER_RUN))
        buffer.extend(zip(batch.time_s, batch.voltage_V, batch.current_A))
        if len(self.points) > RUNS_KEPT:  # runs long gone: keep the newest
            for old in list(self.points)[: len(self.points) - RUNS_KEPT]:
                del self.points[old]
        self._broadcast(
            {
                "kind": "points",
                "run_id": batch.run_id,
                "time_s": list(batch.time_s),
                "voltage_V": list(batch.voltage_V),
                "current_A": list(batch.current_A),
            },
            lab=lab,
            run_id=batch.run_id,
        )

    def lab_snapshot(self, lab: str | None = None) -> dict[str, Any]:
        tiles = [t.model_dump() for (tlab, _), t in sorted(self.tiles.items()) if lab in (None, "", tlab)]
        labs = sorted({tlab for tlab, _ in self.tiles})
        events = [e for e in self.events if lab in (None, "", e["lab"])]
        return {
            "broker": {"state": self.broker_state, "detail": self.broker_detail},
            "labs": labs,
            "tiles": tiles,
            "events": events[-50:],
        }
