"""A live view of every channel, built from MQTT alone: it never polls an instrument.

Anyone who reaches the broker can watch: status (retained) gives each
channel's state at once, events give the latest step ends and run starts/stops,
and the twin's cell states (retained) and anomalies show what it sees.
"""

from __future__ import annotations

import time
from collections import deque

from rich.console import Group
from rich.live import Live
from rich.table import Table

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.documents import Anomaly, CellState, ChannelStatus, RunStart, RunStop, SecurityEvent, StepEvent
from labtwin.security import BrokerConnection, as_identity


class MonitorView:
    def __init__(self, max_events: int = 8) -> None:
        self.channels: dict[str, ChannelStatus] = {}
        self.cells: dict[str, CellState] = {}
        self.events: deque[str] = deque(maxlen=max_events)

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
            table.add_row(
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
            twins.add_row(
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
            events.add_row(line)
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
                    view.absorb(msg.topic, msg.document)
                except TimeoutError:
                    pass
                live.update(view.render())
    return view
