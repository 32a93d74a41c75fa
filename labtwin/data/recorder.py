"""The recorder: every data and event document on the bus, and the twin's anomalies and states, into the store.

It is just another subscriber (the Bluesky way): it never talks to agents.
Documents are written in small transactions (up to ``max_batch`` documents
or ``max_wait_s`` of waiting) in a worker thread, so the event loop keeps
draining the broker while the database commits. Its MQTT session is
persistent, so a brief disconnect loses nothing the broker still holds.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.data.store import Store, WriteCounts
from labtwin.documents import RunStop
from labtwin.security import BrokerConnection, as_identity

log = logging.getLogger(__name__)


@dataclass
class RecorderStats:
    documents: int = 0
    batches: int = 0
    duplicate_batches: int = 0
    conflicts: int = 0  # batches under a stored (run_id, seq) with other samples: kept in the store's batch_conflicts
    samples: int = 0
    events: int = 0
    runs_stopped: int = 0


class Recorder:
    def __init__(
        self,
        broker_url: str | BrokerConnection,
        store: Store,
        lab: str = "+",
        *,
        client_id: str | None = None,
        max_batch: int = 200,
        max_wait_s: float = 0.05,
    ) -> None:
        self.broker_url = broker_url
        self.store = store
        self.lab = lab
        self.client_id = client_id or f"recorder-{lab if lab != '+' else 'all'}"
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = RecorderStats()
        self.bus: Bus | None = None
        self._ready = asyncio.Event()
        self._stopped_runs: dict[str, int] = {}
        self._run_stopped = asyncio.Condition()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def serve(self, stop: asyncio.Event | None = None) -> None:
        filters = [
            f"{busmod.ROOT}/{self.lab}/+/data",
            f"{busmod.ROOT}/{self.lab}/+/event",
            f"{busmod.ROOT}/{self.lab}/cells/+/anomaly",
            f"{busmod.ROOT}/{self.lab}/cells/+/state",
        ]
        async with Bus(as_identity(self.broker_url, "recorder"), self.client_id, persistent=True) as bus:
            self.bus = bus
            sub = await bus.subscribe(filters)
            self._ready.set()
            stopper = asyncio.create_task(stop.wait()) if stop else None
            try:
                while stop is None or not stop.is_set():
                    docs = await self._collect(sub, stopper)
                    if docs:
                        await self._write(docs)
            finally:
                if stopper:
                    stopper.cancel()
                # Whatever already arrived is written before leaving.
                rest = []
                while sub.pending():
                    rest.append((await sub.get()).document)
                if rest:
                    await self._write(rest)

    async def _collect(self, sub: busmod.Subscription, stopper: asyncio.Task | None) -> list:
        getter = asyncio.ensure_future(sub.get())
        waiters = [getter] + ([stopper] if stopper else [])
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            return []
        docs = [getter.result().document]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(docs) < self.max_batch:
            if sub.pending():
                docs.append((await sub.get()).document)
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                docs.append((await sub.get(remaining)).document)
            except TimeoutError:
                break
        return docs

    async def _write(self, docs: list) -> None:
        counts: WriteCounts = await asyncio.to_thread(self.store.write, docs)
        s = self.stats
        s.documents += len(docs)
        s.batches += counts.batches
        s.duplicate_batches += counts.duplicate_batches
        s.conflicts += counts.conflicts
        for run_id, seq in counts.conflicting:
            log.warning(
                "run %s: batch %d came again with other samples than the stored one (a forgery, or a publisher that "
                "re-numbered): the stored batch stays, the new one is kept in batch_conflicts (`labtwin runs`)",
                run_id,
                seq,
            )
        s.samples += counts.samples
        s.events += counts.events
        stopped = {d.run_id: d.last_seq for d in docs if isinstance(d, RunStop)}
        if stopped:
            async with self._run_stopped:
                self._stopped_runs.update(stopped)
                s.runs_stopped += len(stopped)
                self._run_stopped.notify_all()

    async def wait_stored(self, run_id: str, timeout_s: float = 30.0) -> None:
        """Wait until a run's RunStop is written and every batch up to its last_seq is stored.

        Data and event topics are not ordered with respect to each other, so the
        RunStop alone does not prove the last batches have landed."""

        async def _wait() -> None:
            async with self._run_stopped:
                await self._run_stopped.wait_for(lambda: run_id in self._stopped_runs)
            last_seq = self._stopped_runs[run_id]
            while len(await asyncio.to_thread(self.store.seqs, run_id)) < last_seq + 1:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(_wait(), timeout_s)
