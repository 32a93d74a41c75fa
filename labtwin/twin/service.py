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
from typing import Any

from labtwin import bus as busmod
from labtwin.bus import Bus, cell_topic, topic
from labtwin.bus.sessions import claim_session
from labtwin.documents import Anomaly, PauseRun, RunStart, RunStop, SampleBatch, StepEvent, StopRun
from labtwin.security import BrokerConnection, as_identity
from labtwin.twin.cell_twin import CellTwin
from labtwin.twin.pacing import FollowProgress

log = logging.getLogger(__name__)

TwinFactory = Callable[[RunStart], CellTwin]


@dataclass
class TwinStats:
    documents: int = 0
    samples: int = 0
    anomalies: int = 0
    stops_requested: int = 0
    pauses_requested: int = 0
    # Documents that decoded but could not be handled (a twin factory or model that raised, a policy it could not
    # apply) and outputs that could not be published: each logged once and skipped, the next one handled.
    bad_documents: int = 0
    unpublished: int = 0
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
        progress: FollowProgress | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.twin_for = twin_for
        self.lab = lab
        self.state_interval_s = state_interval_s
        # None: a persistent session of its own in this working directory (labtwin/bus/sessions.py), claimed
        # when it serves: a fixed, guessable id let any client take the session over.
        self.client_id = client_id
        self.session_name = f"twin-{lab if lab != '+' else 'all'}"
        self.twins: dict[str, CellTwin] = {}
        self._cell_of_run: dict[str, str] = {}
        self._last_state: dict[str, float] = {}
        self.stats = TwinStats()
        self.anomalies: list[Anomaly] = []
        self._ready = asyncio.Event()
        self._anomaly_seen = asyncio.Condition()
        self.finished_runs: set[str] = set()
        # In a dry-run: how far each run is followed, for the simulated channels that wait for it (pacing.py).
        self.progress = progress

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set, under the given client id or this directory's own session for it."""
        session = claim_session(self.session_name) if self.client_id is None else None
        try:
            await self._serve(session.client_id if session else str(self.client_id), stop)
        finally:
            if session is not None:
                session.release()

    async def _serve(self, client_id: str, stop: asyncio.Event | None) -> None:
        filters = [f"{busmod.ROOT}/{self.lab}/+/data", f"{busmod.ROOT}/{self.lab}/+/event"]
        async with Bus(as_identity(self.broker_url, "twin"), client_id, persistent=True) as bus:
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
                    await self._publish(bus, published, received)
                    if self.progress is not None:  # followed once what it found is on the bus
                        for run_id, time_s in published["followed"].items():
                            self.progress.followed(run_id, time_s)
                    if published["anomalies"] or published["finished"]:
                        async with self._anomaly_seen:
                            self._anomaly_seen.notify_all()
            finally:
                if stopper:
                    stopper.cancel()

    async def _publish(self, bus: Bus, published: dict, received: float) -> None:
        """Anomalies (and the StopRun or PauseRun their policy asks for), then cell states; one that cannot be
        published (a state the codec refuses) is logged, counted and skipped, never the end of the service."""
        for lab, cell, anomaly in published["anomalies"]:
            try:
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
            except (ValueError, TypeError) as exc:
                self.stats.unpublished += 1
                log.error("twin of %s: anomaly %s not published, skipped: %s", cell, anomaly.kind, exc)
        for lab, cell, state in published["states"]:
            try:
                await bus.publish(cell_topic(lab, cell, "state"), state, retain=True)
            except (ValueError, TypeError) as exc:
                self.stats.unpublished += 1
                log.error("twin of %s: state not published, skipped: %s", cell, exc)

    def _handle(self, docs: list) -> dict[str, Any]:
        """Each document on its own: one that raises anywhere in its handling (the twin factory, its policy, the
        model) is logged once, counted in ``stats.bad_documents`` and skipped; the rest of the batch goes on."""
        out: dict = {"anomalies": [], "states": [], "finished": False, "followed": {}}
        touched: dict[str, bool] = {}
        for doc in docs:
            self.stats.documents += 1
            try:
                cell = self._handle_one(doc, out)
            except Exception as exc:  # a bad document (or a twin's bug) must not stop every cell's twin
                self.stats.bad_documents += 1
                log.error(
                    "twin: %s of run %s skipped: %s: %s",
                    type(doc).__name__,
                    getattr(doc, "run_id", "?"),
                    type(exc).__name__,
                    str(exc)[:300],
                    exc_info=log.isEnabledFor(logging.DEBUG),
                )
                continue
            if cell is not None:
                force = isinstance(doc, (StepEvent, RunStop, RunStart)) or cell[1]
                touched[cell[0]] = touched.get(cell[0], False) or force
        now = time.monotonic()
        for cell_id, force in touched.items():
            if force or now - self._last_state.get(cell_id, 0.0) >= self.state_interval_s:
                twin = self.twins[cell_id]
                try:
                    state = twin.state
                except Exception as exc:  # a model whose state cannot be read this time: skip this state
                    self.stats.unpublished += 1
                    log.error("twin of %s: state skipped: %s: %s", cell_id, type(exc).__name__, str(exc)[:300])
                    continue
                self._last_state[cell_id] = now
                out["states"].append((twin.lab, cell_id, state))
        return out

    def _handle_one(self, doc, out: dict) -> tuple[str, bool] | None:
        """Feed one document to its cell's twin; the cell and whether it found anything, or None (no twin)."""
        if isinstance(doc, RunStart):
            twin = self.twins.get(doc.cell_id)
            if twin is None:
                twin = self.twin_for(doc)
                twin.lab = doc.lab
                self.twins[doc.cell_id] = twin
            # The run's own policy (its protocol's `anomalies:`), also when the cell's twin outlives a run.
            twin.settings.policy = {kind: action for kind, action in doc.anomaly_policy.items()}
            self._cell_of_run[doc.run_id] = doc.cell_id
        run_id = getattr(doc, "run_id", None)
        cell = self._cell_of_run.get(run_id or "")
        if cell is None:
            return None
        twin = self.twins[cell]
        if isinstance(doc, SampleBatch):
            self.stats.samples += len(doc)
        found = twin.feed(doc)
        if self.progress is not None and run_id:
            if any(a.action in ("stop", "pause") for a in found):
                self.progress.hold(run_id)  # at once: the channel waits while the flow acts
            if isinstance(doc, SampleBatch) and doc.time_s:
                out["followed"][run_id] = doc.time_s[-1]
            elif isinstance(doc, RunStop):
                self.progress.ended(run_id)
        for anomaly in found:
            self.anomalies.append(anomaly)
            self.stats.anomalies += 1
            out["anomalies"].append((twin.lab, cell, anomaly))
        if twin.finished_run_ids - self.finished_runs:
            self.finished_runs |= twin.finished_run_ids
            out["finished"] = True
        return cell, bool(found)

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
