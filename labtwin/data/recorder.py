"""The recorder: every data and event document on the bus, and the twin's anomalies and states, into the store.

It is just another subscriber (the Bluesky way): it never talks to agents.
Documents are written in small transactions (up to ``max_batch`` documents
or ``max_wait_s`` of waiting) in a worker thread, so the event loop keeps
draining the broker while the database commits. Its MQTT session is
persistent, so a brief disconnect loses nothing the broker still holds.

What the broker did not hold (it restarted, dropped a full queue, or this recorder was away) is filled
from the agent's spool: the recorder tracks each run's highest contiguous seq in the store and publishes
a ResendRequest for the missing ranges on the channel's cmd topic (on a RunStop whose last_seq it has not
reached, after a reconnect, and every ``resend_every_s``). A run it holds whole is confirmed to the agent
(``complete``), which then drops it from its spool. It only ever talks to an agent to ask for its data.

Back-pressure: aiomqtt 2.5 has no manual acknowledgement (paho's ``manual_ack`` is not passed through),
so a document is acknowledged when it arrives, not when it is committed. What bounds memory instead: past
``max_pending`` documents waiting, sample batches are shed (counted in ``stats.shed``) and fetched again
from the spool by gap filling once the store has caught up; events are never shed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import sqlalchemy.exc

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.bus.sessions import claim_session
from labtwin.data.store import Store, WriteCounts
from labtwin.documents import ResendRequest, RunStart, RunStop, SampleBatch
from labtwin.documents.base import INT_MAX
from labtwin.documents.commands import MAX_RESEND_RANGES
from labtwin.security import BrokerConnection, as_identity
from labtwin.security.policy import topic_parts

log = logging.getLogger(__name__)

BAD_DATA: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.DataError,
    sqlalchemy.exc.IntegrityError,
    ValueError,
    TypeError,
    OverflowError,
)
"""What a store raises for a document it cannot take, as opposed to a store that is not there."""


@dataclass
class RecorderStats:
    documents: int = 0
    batches: int = 0
    duplicate_batches: int = 0
    conflicts: int = 0  # batches under a stored (run_id, seq) with other samples: kept in the store's batch_conflicts
    samples: int = 0
    events: int = 0
    runs_stopped: int = 0
    resend_requests: int = 0  # ResendRequests published (gap filling from the agents' spools)
    runs_complete: int = 0  # runs confirmed whole to their agent
    shed: int = 0  # batches dropped while the store was behind (fetched again by gap filling)
    bad_documents: int = 0  # documents the store refused (logged and skipped; the rest of their write stored)


@dataclass
class RunTrack:
    """What the store holds of one run's batches: all seqs up to ``contiguous``, and ``above`` beyond it."""

    lab: str
    channel: str
    contiguous: int = -1
    above: set[int] = field(default_factory=set)
    last_seq: int | None = None  # from the RunStop
    has_start: bool = False
    seen_max: int = -1  # the highest seq known to exist (stored, or the RunStop's last_seq)
    asked_max: int = -1  # seen_max at the previous periodic request: older gaps had a period to arrive
    last_heard_s: float = field(default_factory=time.monotonic)
    last_probe_s: float = 0.0

    def add(self, seq: int) -> None:
        if seq <= self.contiguous:
            return
        self.above.add(seq)
        self.seen_max = max(self.seen_max, seq)
        while self.contiguous + 1 in self.above:
            self.contiguous += 1
            self.above.discard(self.contiguous)

    def missing(self, up_to: int) -> list[tuple[int, int]]:
        """Inclusive ranges of seqs <= up_to the store lacks."""
        ranges: list[tuple[int, int]] = []
        start = self.contiguous + 1
        for seq in sorted(s for s in self.above if s <= up_to):
            if seq > start:
                ranges.append((start, seq - 1))
            start = seq + 1
        if start <= up_to:
            ranges.append((start, up_to))
        return ranges

    @property
    def whole(self) -> bool:
        return self.has_start and self.last_seq is not None and self.contiguous >= self.last_seq


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
        resend_every_s: float = 2.0,
        probe_quiet_s: float = 30.0,
        max_pending: int = 50_000,
    ) -> None:
        self.broker_url = broker_url
        self.store = store
        self.lab = lab
        # None: a persistent session of its own in this working directory (labtwin/bus/sessions.py), claimed
        # when it serves: a fixed, guessable id let any client take the session over.
        self.client_id = client_id
        self.session_name = f"recorder-{lab if lab != '+' else 'all'}"
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = RecorderStats()
        self.bus: Bus | None = None
        self._ready = asyncio.Event()
        self._stopped_runs: dict[str, int] = {}
        self._run_stopped = asyncio.Condition()
        self.resend_every_s = resend_every_s
        self.probe_quiet_s = probe_quiet_s
        self.max_pending = max_pending
        self.tracks: dict[str, RunTrack] = {}
        self._reconnects_seen = 0

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
        filters = [
            f"{busmod.ROOT}/{self.lab}/+/data",
            f"{busmod.ROOT}/{self.lab}/+/event",
            f"{busmod.ROOT}/{self.lab}/cells/+/anomaly",
            f"{busmod.ROOT}/{self.lab}/cells/+/state",
        ]
        async with Bus(as_identity(self.broker_url, "recorder"), client_id, persistent=True) as bus:
            self.bus = bus
            sub = await bus.subscribe(filters)
            await self._track_unfinished()
            self._ready.set()
            stopper = asyncio.create_task(stop.wait()) if stop else None
            filler = asyncio.create_task(self._fill_gaps())
            try:
                while stop is None or not stop.is_set():
                    messages = await self._collect(sub, stopper)
                    if messages:
                        await self._write_messages(messages)
            finally:
                if stopper:
                    stopper.cancel()
                filler.cancel()
                # Whatever already arrived is written before leaving.
                rest = []
                while sub.pending():
                    rest.append(await sub.get())
                if rest:
                    await self._write_messages(rest)

    async def _collect(self, sub: busmod.Subscription, stopper: asyncio.Task | None) -> list[busmod.Message]:
        getter = asyncio.ensure_future(sub.get())
        waiters = [getter] + ([stopper] if stopper else [])
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            return []
        messages = [getter.result()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(messages) < self.max_batch:
            if sub.pending():
                messages.append(await sub.get())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                messages.append(await sub.get(remaining))
            except TimeoutError:
                break
        if sub.pending() > self.max_pending:
            messages += await self._shed(sub)
        return messages

    async def _shed(self, sub: busmod.Subscription) -> list[busmod.Message]:
        """The store is behind: drop the waiting batches down to half the bound (gap filling fetches them again
        from the agents' spools), keep every other document."""
        kept: list[busmod.Message] = []
        while sub.pending() > self.max_pending // 2:
            message = await sub.get()
            if isinstance(message.document, SampleBatch):
                self.stats.shed += 1
            else:
                kept.append(message)
        log.warning(
            "recorder: the store is behind (over %d documents waiting): %d batches shed so far, fetched again from "
            "the agents' spools",
            self.max_pending,
            self.stats.shed,
        )
        return kept

    async def _write_messages(self, messages: list[busmod.Message]) -> None:
        docs = [m.document for m in messages]
        counts = await self._write(docs)
        refused = set(counts.refusing)
        stops: list[str] = []
        for message in messages:
            doc = message.document
            if not isinstance(doc, (SampleBatch, RunStart, RunStop)) or (doc.run_id, doc.channel) in refused:
                continue
            track = await self._track(doc.run_id, message.topic, doc.channel)
            track.last_heard_s = time.monotonic()
            if isinstance(doc, SampleBatch):
                track.add(doc.seq)
            elif isinstance(doc, RunStart):
                track.has_start = True
            else:
                track.last_seq = doc.last_seq
                track.seen_max = max(track.seen_max, doc.last_seq)
                stops.append(doc.run_id)
        for run_id in dict.fromkeys(stops):  # a RunStop whose last_seq the store has not reached: ask at once
            stopped = self.tracks.get(run_id)
            if stopped is not None:  # None: found whole and let go while this one awaited (nothing to ask for)
                await self._request(run_id, stopped, now=True)

    async def _write(self, docs: list) -> WriteCounts:
        try:
            counts: WriteCounts = await asyncio.to_thread(self.store.write, docs)
        except BAD_DATA:
            # One document the database refuses (a NUL in a label, a value out of its range) must not take the
            # others, or the recorder, with it: each alone, the refused ones logged, counted and skipped. A store
            # that is down (OperationalError) is not this: it propagates, and gap filling refetches after.
            counts = await asyncio.to_thread(self._write_each, docs)
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
        return counts

    def _write_each(self, docs: list) -> WriteCounts:
        total = WriteCounts()
        for doc in docs:
            try:
                counts = self.store.write([doc])
            except BAD_DATA as exc:
                self.stats.bad_documents += 1
                log.warning(
                    "skipped a %s of run %s that the store refuses: %s",
                    getattr(doc, "kind", type(doc).__name__),
                    getattr(doc, "run_id", "?"),
                    str(exc).splitlines()[0][:200],
                )
                continue
            for name in ("batches", "duplicate_batches", "samples", "events", "conflicts", "refused"):
                setattr(total, name, getattr(total, name) + getattr(counts, name))
            total.conflicting += counts.conflicting
            total.refusing += counts.refusing
        return total

    # ------------------------------------------------------------------ gap filling

    async def _track(self, run_id: str, topic: str, channel: str) -> RunTrack:
        """The run's track; on first sight, from what the store already holds (a restarted recorder)."""
        track = self.tracks.get(run_id)
        if track is None:
            parts = topic_parts(topic)
            lab = parts[0] if parts is not None else self.lab
            track = RunTrack(lab=lab, channel=channel)
            for seq in await asyncio.to_thread(self.store.seqs, run_id):
                track.add(seq)
            start, stop = await asyncio.to_thread(self.store.run_documents, run_id)
            track.has_start = start is not None
            if stop is not None:
                track.last_seq = stop.last_seq
                track.seen_max = max(track.seen_max, stop.last_seq)
            self.tracks[run_id] = track
        return track

    async def _track_unfinished(self) -> None:
        """At start: the stored runs of this lab with no RunStop may have gone on while this recorder was away."""
        if self.lab == "+":
            return
        for row in await asyncio.to_thread(self.store.runs):
            if row.stopped_at is None and row.channel and (row.lab in (None, self.lab)):
                track = await self._track(row.run_id, busmod.topic(self.lab, row.channel, "data"), row.channel)
                track.last_probe_s = 0.0
                track.last_heard_s = 0.0

    async def _fill_gaps(self) -> None:
        """Asks again for what is missing: at once after a reconnect, else every resend_every_s."""
        last_round = time.monotonic()
        while True:
            await asyncio.sleep(min(0.25, self.resend_every_s))
            bus = self.bus
            reconnected = bus is not None and bus.stats.reconnects != self._reconnects_seen
            if bus is not None:
                self._reconnects_seen = bus.stats.reconnects
            if not reconnected and time.monotonic() - last_round < self.resend_every_s:
                continue
            last_round = time.monotonic()
            for run_id, track in list(self.tracks.items()):
                try:
                    await self._request(run_id, track, now=reconnected)
                except Exception:  # a bad track must not stop gap filling for the others
                    log.exception("recorder: gap filling for run %s failed", run_id)

    async def _request(self, run_id: str, track: RunTrack, *, now: bool) -> None:
        """Publish the run's ResendRequest, if it misses anything; a run held whole is confirmed and dropped.

        ``now``: every gap up to the highest seq known (a RunStop, a reconnect); else only the gaps that were
        there at the previous round, so a batch still on its way is not asked for twice. A run that went quiet
        without a RunStop is probed for its tail (and its events) every probe_quiet_s."""
        if self.bus is None:
            return
        if track.whole:
            await self._publish(track, ResendRequest(run_id=run_id, channel=track.channel, complete=True))
            self.stats.runs_complete += 1
            del self.tracks[run_id]
            return
        up_to = track.seen_max if now else min(track.seen_max, track.asked_max)
        track.asked_max = track.seen_max
        ranges = track.missing(up_to)
        events = track.last_seq is not None and not track.has_start
        clock = time.monotonic()
        quiet = track.last_seq is None and clock - track.last_heard_s > self.probe_quiet_s
        if quiet and clock - track.last_probe_s > self.probe_quiet_s:
            track.last_probe_s = clock
            ranges.append((track.seen_max + 1, INT_MAX))  # whatever the agent holds beyond: its tail, its RunStop
            events = True
        if ranges or events:
            await self._publish(
                track,
                ResendRequest(run_id=run_id, channel=track.channel, ranges=ranges[:MAX_RESEND_RANGES], events=events),
            )

    async def _publish(self, track: RunTrack, request: ResendRequest) -> None:
        assert self.bus is not None
        self.stats.resend_requests += 0 if request.complete else 1
        log.info(
            "recorder: run %s on %s/%s: %s",
            request.run_id,
            track.lab,
            track.channel,
            "stored whole" if request.complete else f"asking again for {request.ranges} (events: {request.events})",
        )
        await self.bus.publish(busmod.topic(track.lab, track.channel, "cmd"), request)

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
