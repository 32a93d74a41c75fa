"""`labtwin twin`: one twin per cell, following the bus, publishing state and anomalies.

Subscribes to every channel's data and event topics of a lab; a run's
RunStart says which cell is on the channel (cell_id) and the lab file which
model to run in the loop for it. Publishes each cell's state retained on
labtwin/v1/<lab>/cells/<cell>/state (at most every ``state_interval_s`` of
wall time, and at every step event) and each anomaly on .../anomaly the
moment its evidence is complete. An anomaly whose protocol policy says
``stop`` sends the channel's agent a StopRun: the agent, next to the
instrument, puts it in its safe state; the flow sees the run end. ``pause``
sends a PauseRun: the agent holds the cell at open circuit (still sampling,
still checking its limits) until a person resumes it (`labtwin resume`).

Twins work in a thread of their own (a model step of a many-particle cell
takes milliseconds), so the event loop keeps draining the broker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from labtwin import bus as busmod
from labtwin.bus import Bus, cell_topic, topic
from labtwin.documents import Anomaly, PauseRun, RunStart, RunStop, SampleBatch, StepEvent, StopRun
from labtwin.security import BrokerConnection, as_identity
from labtwin.twin.cell_twin import CellTwin

log = logging.getLogger(__name__)

TwinFactory = Callable[[RunStart], CellTwin]


@dataclass
class TwinStats:
    documents: int = 0
    samples: int = 0
    anomalies: int = 0
    stops_requested: int = 0
    pauses_requested: int = 0
    latencies_s: list[float] = field(default_factory=list)


class TwinService:
    def __init__(
        self,
        broker_url: str | BrokerConnection,
        twin_for: TwinFactory,
        lab: str = "+",
        *,
        state_interval_s: float = 0.5,
        client_id: str | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.twin_for = twin_for
        self.lab = lab
        self.state_interval_s = state_interval_s
        self.client_id = client_id or f"twin-{lab if lab != '+' else 'all'}"
        self.twins: dict[str, CellTwin] = {}
        self._cell_of_run: dict[str, str] = {}
        self._last_state: dict[str, float] = {}
        self.stats = TwinStats()
        self.anomalies: list[Anomaly] = []
        self._ready = asyncio.Event()
        self._anomaly_seen = asyncio.Condition()
        self.finished_runs: set[str] = set()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        filters = [f"{busmod.ROOT}/{self.lab}/+/data", f"{busmod.ROOT}/{self.lab}/+/event"]
        async with Bus(as_identity(self.broker_url, "twin"), self.client_id, persistent=True) as bus:
            sub = await bus.subscribe(filters)
            self._ready.set()
            stopper = asyncio.create_task(stop.wait()) if stop else None
            try:
                while stop is None or not stop.is_set():
                    getter = asyncio.ensure_future(sub.get())
                    await asyncio.wait([getter] + ([stopper] if stopper else []), return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    message = getter.result()
                    docs = [message.document]
                    while sub.pending() and len(docs) < 200:
                        docs.append((await sub.get()).document)
                    received = time.perf_counter()
                    published = await asyncio.to_thread(self._handle, docs)
                    for lab, cell, anomaly in published["anomalies"]:
                        await bus.publish(cell_topic(lab, cell, "anomaly"), anomaly)
                        self.stats.latencies_s.append(time.perf_counter() - received)
                        if anomaly.action == "stop" and anomaly.run_id:
                            await bus.publish(
                                topic(lab, anomaly.channel, "cmd"),
                                StopRun(
                                    run_id=anomaly.run_id,
                                    exit_status="aborted",
                                    reason=f"twin: {anomaly.kind}: {anomaly.message}",
                                ),
                            )
                            self.stats.stops_requested += 1
                        elif anomaly.action == "pause" and anomaly.run_id:
                            await bus.publish(
                                topic(lab, anomaly.channel, "cmd"),
                                PauseRun(run_id=anomaly.run_id, reason=f"twin: {anomaly.kind}: {anomaly.message}"),
                            )
                            self.stats.pauses_requested += 1
                    for lab, cell, state in published["states"]:
                        await bus.publish(cell_topic(lab, cell, "state"), state, retain=True)
                    if published["anomalies"] or published["finished"]:
                        async with self._anomaly_seen:
                            self._anomaly_seen.notify_all()
            finally:
                if stopper:
                    stopper.cancel()

    def _handle(self, docs: list) -> dict[str, list]:
        out: dict = {"anomalies": [], "states": [], "finished": False}
        touched: dict[str, bool] = {}
        for doc in docs:
            self.stats.documents += 1
            if isinstance(doc, RunStart):
                twin = self.twins.get(doc.cell_id)
                if twin is None:
                    twin = self.twins[doc.cell_id] = self.twin_for(doc)
                    twin.lab = doc.lab
                # The run's own policy (its protocol's `anomalies:`), also when the cell's twin outlives a run.
                twin.settings.policy = {kind: action for kind, action in doc.anomaly_policy.items()}
                self._cell_of_run[doc.run_id] = doc.cell_id
            run_id = getattr(doc, "run_id", None)
            cell = self._cell_of_run.get(run_id or "")
            if cell is None:
                continue
            twin = self.twins[cell]
            if isinstance(doc, SampleBatch):
                self.stats.samples += len(doc)
            try:
                found = twin.feed(doc)
            except Exception:  # a twin's bug must not take the service (and every other cell's twin) down
                log.exception("twin %s failed on %s", cell, type(doc).__name__)
                continue
            for anomaly in found:
                self.anomalies.append(anomaly)
                self.stats.anomalies += 1
                out["anomalies"].append((twin.lab, cell, anomaly))
            if twin.finished_run_ids - self.finished_runs:
                self.finished_runs |= twin.finished_run_ids
                out["finished"] = True
            force = isinstance(doc, (StepEvent, RunStop, RunStart)) or bool(found)
            touched[cell] = touched.get(cell, False) or force
        now = time.monotonic()
        for cell, force in touched.items():
            if force or now - self._last_state.get(cell, 0.0) >= self.state_interval_s:
                self._last_state[cell] = now
                twin = self.twins[cell]
                out["states"].append((twin.lab, cell, twin.state))
        return out

    async def wait_run_followed(self, run_id: str, timeout_s: float = 60.0) -> None:
        """Until the twin has applied a run's RunStop, i.e. every document of the run."""

        async def _wait() -> None:
            async with self._anomaly_seen:
                await self._anomaly_seen.wait_for(lambda: run_id in self.finished_runs)

        await asyncio.wait_for(_wait(), timeout_s)

    async def wait_for_anomaly(self, predicate: Callable[[Anomaly], bool], timeout_s: float = 30.0) -> Anomaly:
        async def _wait() -> Anomaly:
            async with self._anomaly_seen:
                while True:
                    for anomaly in self.anomalies:
                        if predicate(anomaly):
                            return anomaly
                    await self._anomaly_seen.wait()

        return await asyncio.wait_for(_wait(), timeout_s)
