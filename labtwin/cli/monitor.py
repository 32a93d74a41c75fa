"""A live view of every channel, built from MQTT alone: it never polls an instrument.

Anyone who reaches the broker can watch: status (retained) gives each
channel's state at once, events give the latest step ends and run starts/stops,
and the twin's cell states (retained) and anomalies show what it sees.
"""

from __future__ import annotations

import io
import logging
import time
from collections import deque

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.documents import (
    Anomaly,
    CellState,
    ChannelStatus,
    Outage,
    RunStart,
    RunStop,
    SecurityEvent,
    StepEvent,
)
from labtwin.security import BrokerConnection, as_identity

log = logging.getLogger(__name__)


def _row(table: Table, *cells: str) -> None:
    """A row of plain text: a label or reason such as "[/bold]" shows as sent, never parsed as rich markup."""
    table.add_row(*(Text(c) for c in cells))


class MonitorView:
    def __init__(self, max_events: int = 8) -> None:
        self.channels: dict[str, ChannelStatus] = {}
        self.cells: dict[str, CellState] = {}
        self.events: deque[str] = deque(maxlen=max_events)
        self.bad_documents = 0  # decoded, but the view could not take or show them: logged, counted, skipped

    def take(self, topic_name: str, doc) -> bool:
        """``absorb`` that survives any document: one the view cannot take or render is logged, counted in
        ``bad_documents`` and undone, so the view shows what it showed before and the next message is taken."""
        before = (dict(self.channels), dict(self.cells), list(self.events))
        try:
            self.absorb(topic_name, doc)
            Console(file=io.StringIO(), width=200).print(self.render())  # what Live will draw must draw
        except Exception as exc:
            self.channels, self.cells = before[0], before[1]
            self.events.clear()
            self.events.extend(before[2])
            self.bad_documents += 1
            log.error("monitor: %s on %s skipped: %s: %s", type(doc).__name__, topic_name, type(exc).__name__, exc)
            return False
        return True

    def absorb(self, topic_name: str, doc) -> None:
        if isinstance(doc, ChannelStatus):
            self.channels[doc.channel] = doc
        elif isinstance(doc, StepEvent) and doc.event == "ended":
            r = doc.reason
            self.events.append(
                f"{doc.channel} step {doc.step_index} '{doc.label}' ended"
                + (f": {r.kind}:{r.name}" if r is not None else "")
                + (f" = {r.value:.4g}" if r is not None and r.value is not None else "")
            )
        elif isinstance(doc, RunStart):
            self.events.append(f"{doc.channel} run {doc.run_id} started: {doc.protocol} on {doc.cell_id}")
        elif isinstance(doc, RunStop):
            self.events.append(f"{doc.channel} run {doc.run_id} stopped: {doc.exit_status} {doc.reason}")
        elif isinstance(doc, CellState):
            self.cells[doc.cell] = doc
        elif isinstance(doc, Anomaly):
            self.events.append(f"ANOMALY {doc.kind} on {doc.cell} ({doc.action}): {doc.message}")
        elif isinstance(doc, Outage):
            charge = f"{doc.charge_Ah * 1e3:.4g} mAh" if doc.charge_Ah is not None else "charge unknown"
            self.events.append(
                f"OUTAGE {doc.channel} run {doc.run_id}: no agent for {doc.span_s:.0f} s of cell time "
                f"({doc.wall_span_s:.1f} s wall), {charge}"
            )
        elif isinstance(doc, SecurityEvent):
            self.events.append(
                f"SECURITY {doc.channel} refused a command from {doc.sender or 'an unsigned sender'}: {doc.reason}"
            )

    def render(self):
        table = Table(title="labtwin channels", expand=False)
        for col in ("channel", "state", "cell", "run", "step", "cycle", "voltage / V", "current / A", "updated"):
            table.add_column(col)
        for name in sorted(self.channels):
            s = self.channels[name]
            _row(
                table,
                name,
                s.state.value,
                s.cell_id or "",
                (s.run_id or "")[-22:],
                f"{s.step_index} {s.label or ''}" if s.step_index is not None else "",
                "" if s.cycle is None else str(s.cycle),
                "" if s.voltage_V is None else f"{s.voltage_V:.4f}",
                "" if s.current_A is None else f"{s.current_A:.4g}",
                s.time.strftime("%H:%M:%S"),
            )
        twins = Table(title="twins", expand=False)
        for col in (
            "cell",
            "model",
            "cycle",
            "SOC",
            "V / V",
            "predicted / V",
            "R0 / ohm",
            "capacity / mAh",
            "CE",
            "anomalies",
        ):
            twins.add_column(col)
        for name in sorted(self.cells):
            c = self.cells[name]
            _row(
                twins,
                name,
                c.model,
                str(c.cycle),
                "" if c.soc is None else f"{c.soc:.0%}",
                "" if c.voltage_V is None else f"{c.voltage_V:.4f}",
                "" if c.predicted_voltage_V is None else f"{c.predicted_voltage_V:.4f}",
                "" if c.series_resistance_ohm is None else f"{c.series_resistance_ohm:.3g}",
                "" if c.capacity_Ah is None else f"{c.capacity_Ah * 1e3:.4g}",
                "" if c.coulombic_efficiency is None else f"{c.coulombic_efficiency:.2%}",
                str(c.anomalies),
            )
        events = Table(title="latest events", show_header=False, expand=False)
        events.add_column("event")
        for line in self.events:
            events.add_row(Text(line))
        return Group(table, twins, events) if self.cells else Group(table, events)


async def monitor(
    broker_url: str | BrokerConnection, lab: str = "+", seconds: float | None = None, console=None
) -> MonitorView:
    """Show the live view until interrupted (or for ``seconds``); returns what it saw."""
    view = MonitorView()
    filters = [
        f"{busmod.ROOT}/{lab}/+/status",
        f"{busmod.ROOT}/{lab}/+/event",
        f"{busmod.ROOT}/{lab}/cells/+/state",
        f"{busmod.ROOT}/{lab}/cells/+/anomaly",
    ]
    async with Bus(as_identity(broker_url, "viewer")) as bus:
        sub = await bus.subscribe(filters)
        deadline = None if seconds is None else time.monotonic() + seconds
        with Live(view.render(), console=console, refresh_per_second=4, transient=False) as live:
            while deadline is None or time.monotonic() < deadline:
                try:
                    msg = await sub.get(0.25)
                except TimeoutError:
                    pass
                else:
                    view.take(msg.topic, msg.document)
                live.update(view.render())
    return view
