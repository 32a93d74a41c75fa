"""The alert service: follows a lab on the bus as a viewer, fires alerts by its rules, sends them.

It reads what ``labtwin monitor`` reads (events of every channel, the twin's anomalies) and publishes nothing, so
it needs only the viewer role of a secured lab. Each destination has its own queue and worker: a receiver that is
down or slow costs one log line per alert it misses and holds up neither the bus nor the other destinations.
Every alert also goes to the ``AlertFeed`` (the dashboard's), whatever the rule's destinations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Mapping

from pydantic import BaseModel

from labtwin import bus as busmod
from labtwin.alerts.config import AlertsConfig
from labtwin.alerts.engine import Alert, AlertEngine
from labtwin.alerts.senders import AlertFeed, Sender, SendError, make_sender
from labtwin.bus import Bus
from labtwin.security import BrokerConnection, as_identity

log = logging.getLogger(__name__)

QUEUE_SIZE = 200
"""Alerts waiting for one destination; beyond it (a receiver down for long while a lab keeps failing) new ones are
dropped for that destination with a log line, and the feed still has them."""


def alert_filters(lab: str) -> list[str]:
    return [f"{busmod.ROOT}/{lab}/+/event", f"{busmod.ROOT}/{lab}/cells/+/anomaly"]


class Dispatcher:
    """One queue and one worker per destination; ``offer`` never waits."""

    def __init__(self, senders: Mapping[str, Sender], queue_size: int = QUEUE_SIZE) -> None:
        self.senders = dict(senders)
        self._queues: dict[str, asyncio.Queue[Alert]] = {n: asyncio.Queue(maxsize=queue_size) for n in self.senders}
        self._workers: list[asyncio.Task] = []
        self.sent: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    async def __aenter__(self) -> Dispatcher:
        self._workers = [asyncio.create_task(self._work(name), name=f"alerts-{name}") for name in self.senders]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def offer(self, alert: Alert) -> None:
        for name in alert.destinations:
            queue = self._queues.get(name)
            if queue is None:
                continue
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                self.dropped[name] += 1
                log.warning(
                    "alerts: %s: %d alerts wait already; %s on %s dropped", name, queue.qsize(), alert.kind, alert.cell
                )

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued alert was tried; False if that took longer than ``timeout_s``."""
        try:
            await asyncio.wait_for(asyncio.gather(*(q.join() for q in self._queues.values())), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _work(self, name: str) -> None:
        sender, queue = self.senders[name], self._queues[name]
        while True:
            alert = await queue.get()
            try:
                await sender.send(alert)
                self.sent[name] += 1
            except SendError as exc:
                self.failed[name] += 1
                log.warning(
                    "alerts: %s (%s): %s on %s not sent: %s", name, sender.describe(), alert.kind, alert.cell, exc
                )
            except Exception as exc:  # a sender's bug must not end the destination's worker
                self.failed[name] += 1
                log.error(
                    "alerts: %s: %s on %s not sent: %s: %s", name, alert.kind, alert.cell, type(exc).__name__, exc
                )
            finally:
                queue.task_done()


class AlertService:
    """Follow ``lab`` on the broker and send its alerts until ``stop`` is set."""

    def __init__(
        self,
        broker: str | BrokerConnection,
        config: AlertsConfig,
        lab: str,
        cells_by_channel: dict[str, str] | None = None,
        feed: AlertFeed | None = None,
        senders: Mapping[str, Sender] | None = None,
    ) -> None:
        self.broker = as_identity(broker, "viewer")
        self.config = config
        self.lab = lab
        self.engine = AlertEngine(config, lab, dict(cells_by_channel or {}))
        self.feed = feed if feed is not None else AlertFeed()
        self.senders = (
            dict(senders)
            if senders is not None
            else {name: make_sender(name, dest) for name, dest in config.destinations.items()}
        )
        self.dispatcher = Dispatcher(self.senders)
        self.ready = asyncio.Event()
        self.bad_documents = 0

    def take(self, document: BaseModel) -> list[Alert]:
        """One document through the rules; the alerts go to the feed and the destinations' queues."""
        try:
            alerts = self.engine.take(document)
        except Exception as exc:  # one document the rules cannot read must not end the service
            self.bad_documents += 1
            log.error("alerts: %s skipped: %s: %s", type(document).__name__, type(exc).__name__, exc)
            return []
        for alert in alerts:
            self.feed.publish(alert)
            self.dispatcher.offer(alert)
        return alerts

    async def serve(self, stop: asyncio.Event | None = None, drain_s: float = 10.0) -> None:
        stop = stop or asyncio.Event()
        async with Bus(self.broker) as bus, self.dispatcher:
            sub = await bus.subscribe(alert_filters(self.lab))
            self.ready.set()
            stopper = asyncio.create_task(stop.wait())
            try:
                while not stop.is_set():
                    getter = asyncio.ensure_future(sub.get())
                    await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    self.take(getter.result().document)
                if not await self.dispatcher.drain(drain_s):
                    log.warning("alerts: stopping with alerts still unsent after %.0f s", drain_s)
            finally:
                stopper.cancel()
                sub.close()
