"""Which alerts fire: bus documents in, alerts out, de-duplicated and rate-limited. No I/O here.

The twin may report an oscillation onset at every check of a half cycle, an agent repeats a RunStop to a flow
that lost it across a reconnect: a person should get one message for each thing that happened, not one per
document. So every rule keys what it saw (an anomaly by run, kind and its ``once_per``; a run end and a safety
trip by run) and fires once per key; on top, ``min_interval_s`` holds back a rule's alerts for one cell, and the
number held back rides on the next alert that goes out.

Documents understood (labtwin.documents): ``RunStart`` (remembers each run's cell, since a ``RunStop`` or a
``StepEvent`` carries only the channel), ``Anomaly``, ``RunStop`` and a ``StepEvent`` that ended on a
``safety_limit`` (the agent's trip, labtwin.agent.safety). Anything else is ignored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, Field

from labtwin.alerts.config import AlertRule, AlertsConfig
from labtwin.documents import Anomaly, RunStart, RunStop, StepEvent, utc_now

REMEMBERED = 10_000
"""Keys (and runs) kept for de-duplication; the oldest go first, so a months-long service stays bounded."""


class Alert(BaseModel):
    """One message for people; ``text`` is what a chat shows, the rest is for receivers that read fields."""

    lab: str
    channel: str = ""
    cell: str = ""
    run_id: str = ""
    kind: str = Field(description="the anomaly's kind, run_success / run_aborted / run_failed, safety_trip, test")
    rule: str = ""
    message: str
    link: str
    suppressed: int = Field(0, description="alerts of this rule and cell held back by min_interval_s before this")
    time: datetime = Field(default_factory=utc_now)
    destinations: list[str] = Field(default_factory=list, exclude=True)

    @property
    def subject(self) -> str:
        where = ", ".join(p for p in (self.channel, f"run {self.run_id}" if self.run_id else "") if p)
        return f"[labtwin {self.lab}] {self.kind} on {self.cell or 'unknown cell'}" + (f" ({where})" if where else "")

    @property
    def text(self) -> str:
        held = f" ({self.suppressed} more held back by the rule's min_interval_s)" if self.suppressed else ""
        return f"{self.subject}: {self.message}{held} {self.link}"

    def fields(self) -> dict[str, object]:
        """The webhook's JSON body: ``text`` first, then every field."""
        return {"text": self.text, **self.model_dump(mode="json")}


def run_link(dashboard_url: str, run_id: str) -> str:
    """The run's page on the dashboard; the dashboard itself when the document names no run (a replay)."""
    return f"{dashboard_url}/run/{run_id}" if run_id else f"{dashboard_url}/"


@dataclass
class EngineStats:
    fired: int = 0
    duplicates: int = 0
    held_back: int = 0


@dataclass
class _Run:
    channel: str
    cell: str


@dataclass
class AlertEngine:
    """The rules of one lab's ``alerts:``. ``cells_by_channel``: the lab file's cell ids, for a run whose RunStart
    this engine did not see (the service started after it). ``clock``: monotonic seconds (tests pass their own)."""

    config: AlertsConfig
    lab: str
    cells_by_channel: dict[str, str] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    stats: EngineStats = field(default_factory=EngineStats)
    _runs: OrderedDict[str, _Run] = field(default_factory=OrderedDict)
    _seen: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)
    _last_sent: dict[tuple[int, str], float] = field(default_factory=dict)
    _held: dict[tuple[int, str], int] = field(default_factory=dict)

    def take(self, doc: BaseModel) -> list[Alert]:
        """The alerts this document fires (often none)."""
        if isinstance(doc, RunStart):
            self._remember(self._runs, doc.run_id, _Run(doc.channel, doc.cell_id))
            return []
        out: list[Alert] = []
        for index, rule in enumerate(self.config.rules):
            alert = self._match(rule, doc)
            if alert is None or (rule.channels is not None and alert.channel not in rule.channels):
                continue
            key = (index, *self._key(rule, doc, alert))
            if key in self._seen:
                self.stats.duplicates += 1
                continue
            self._remember(self._seen, key, None)
            if self._hold_back(index, rule, alert.cell):
                continue
            alert.rule = rule.title
            alert.destinations = self.config.destinations_of(rule)
            alert.suppressed = self._held.pop((index, alert.cell), 0)
            self.stats.fired += 1
            out.append(alert)
        return out

    # ------------------------------------------------------------------ matching

    def _match(self, rule: AlertRule, doc: BaseModel) -> Alert | None:
        if rule.when == "anomaly" and isinstance(doc, Anomaly):
            if rule.kinds is not None and doc.kind not in rule.kinds:
                return None
            where = f" (cycle {doc.cycle}, step {doc.step}, at {doc.time_s / 3600:.2f} h test time)"
            return self._alert(doc.kind, doc.channel, doc.run_id, doc.message + where, cell=doc.cell)
        if rule.when == "run_end" and isinstance(doc, RunStop):
            if doc.exit_status not in rule.exit_status:
                return None
            why = f": {doc.reason}" if doc.reason else ""
            message = f"run ended {doc.exit_status}{why} ({doc.n_samples} samples, {doc.cell_time_s / 3600:.2f} h)"
            return self._alert(f"run_{doc.exit_status}", doc.channel, doc.run_id, message)
        if rule.when == "safety_trip" and isinstance(doc, StepEvent):
            r = doc.reason
            if doc.event != "ended" or r is None or r.kind != "safety_limit":
                return None
            beyond = (
                f": {r.value:.4g} beyond {r.threshold:.4g}" if r.value is not None and r.threshold is not None else ""
            )
            detail = f" ({r.message})" if r.message else ""
            message = (
                f"safety limit {r.name} tripped in step {doc.step_index} '{doc.label}'{beyond}{detail}; "
                "the agent turned the output off"
            )
            return self._alert("safety_trip", doc.channel, doc.run_id, message)
        return None

    def _alert(self, kind: str, channel: str, run_id: str, message: str, cell: str = "") -> Alert:
        run = self._runs.get(run_id)
        cell = cell or (run.cell if run else "") or self.cells_by_channel.get(channel, "")
        return Alert(
            lab=self.lab,
            channel=channel or (run.channel if run else ""),
            cell=cell,
            run_id=run_id,
            kind=kind,
            message=message,
            link=run_link(self.config.dashboard_url, run_id),
        )

    @staticmethod
    def _key(rule: AlertRule, doc: BaseModel, alert: Alert) -> tuple[Hashable, ...]:
        """What makes two documents the same event for this rule."""
        whose = (alert.run_id or alert.cell, alert.kind)
        if not isinstance(doc, Anomaly):
            return whose  # a run ends once and trips once, however often it is said
        once_per = rule.once_per or ("half_cycle" if doc.kind == "oscillation_onset" else "run")
        if once_per == "half_cycle":
            return (*whose, doc.cycle, doc.step)  # a half cycle is one current-carrying step of its cycle
        if once_per == "cycle":
            return (*whose, doc.cycle)
        return whose

    def _hold_back(self, index: int, rule: AlertRule, cell: str) -> bool:
        if rule.min_interval_s <= 0:
            return False
        now = self.clock()
        last = self._last_sent.get((index, cell))
        if last is not None and now - last < rule.min_interval_s:
            self._held[(index, cell)] = self._held.get((index, cell), 0) + 1
            self.stats.held_back += 1
            return True
        self._last_sent[(index, cell)] = now
        return False

    @staticmethod
    def _remember(memory: OrderedDict, key: Hashable, value: object) -> None:
        memory[key] = value
        memory.move_to_end(key)
        while len(memory) > REMEMBERED:
            memory.popitem(last=False)
