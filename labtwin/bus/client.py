"""labtwin's MQTT bus: the topic scheme, payload decoding, and a client that survives the broker.

Topics: ``labtwin/v1/<lab>/<channel>/{cmd,event,data,status}``. Commands,
events and data go at QoS 1; status is retained and an agent's last will
marks its channel offline.

aiomqtt does not reconnect by itself (aiomqtt issue #334), so ``Bus`` owns the
loop: it reconnects with back-off, re-subscribes, and re-sends every message
whose PUBACK had not arrived. Messages wait in an outbox while the broker is
away, so a broker restart mid-run loses nothing the publisher produced;
subscribers see duplicates at worst (QoS 1 is at-least-once), and the store
is idempotent on (run_id, seq) for exactly that reason.

A payload that does not decode, or decodes to the wrong schema, is logged,
counted in ``stats.malformed`` and skipped: one bad publisher never stops a
subscriber.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiomqtt
from pydantic import BaseModel

from labtwin.documents.base import MAX_PAYLOAD_BYTES
from labtwin.documents.codec import MalformedPayload, decode, encode
from labtwin.security.connection import BrokerConnection, resolve_transport
from labtwin.security.policy import Duplicate, Refused
from labtwin.security.signing import MAGIC, MAX_HEADER_BYTES, BadSignature, is_sealed, open_envelope

log = logging.getLogger(__name__)


@dataclass
class BusStats:
    published: int = 0
    received: int = 0
    malformed: int = 0
    reconnects: int = 0
    short_sessions: int = 0  # connections in a row that the broker closed within SHORT_SESSION_S
    resent: int = 0
    refused: int = 0  # signed wrongly, unsigned in a lab that requires signing, or from a sender not allowed there
    duplicates: int = 0  # a command redelivered with a nonce already acted on (QoS 1 is at-least-once)


@dataclass(order=True)
class _Outgoing:
    ident: int
    topic: str = field(compare=False)
    payload: bytes = field(compare=False)
    qos: int = field(compare=False)
    retain: bool = field(compare=False)


@dataclass(frozen=True)
class Message:
    topic: str
    document: BaseModel
    sender: str | None = None  # the verified signer; None where the lab does not sign


@dataclass(frozen=True)
class Refusal:
    """A payload this bus would not deliver: where, who it claimed to be from, and why."""

    topic: str
    sender: str | None
    reason: str


class Subscription:
    """An async iterator of decoded documents on some topic filters, fed by the bus."""

    def __init__(self, bus: Bus, filters: tuple[str, ...]) -> None:
        self._bus = bus
        self.filters = filters
        self._queue: asyncio.Queue[Message] = asyncio.Queue()

    def _offer(self, message: Message) -> None:
        self._queue.put_nowait(message)

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        return await self._queue.get()

    async def get(self, timeout_s: float | None = None) -> Message:
        return await asyncio.wait_for(self._queue.get(), timeout_s)

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._bus._unsubscribe(self)


class BrokerUnreachable(ConnectionError):
    pass


class BrokerRefused(BrokerUnreachable):
    """The broker answered and said no: credentials, authorisation or TLS. Retrying will not help."""


SHORT_SESSION_S = 5.0
_TARGETS_MAX = 4096  # topic names whose subscriptions a Bus remembers (a lab has a few per channel)
SHORT_SESSIONS_WARN = 3

_AUTH_CODES = {
    4: "bad username or password",
    5: "not authorised",
    134: "bad username or password",
    135: "not authorised",
}


def _refusal(exc: BaseException, conn: BrokerConnection, username: str | None) -> BrokerRefused | None:
    """A one-line BrokerRefused for a connection the broker refused for credentials or TLS, else None."""
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    who = f"user {username!r}" if username else "labtwin"
    if isinstance(code, int) and code in _AUTH_CODES:
        return BrokerRefused(
            f"the MQTT broker at {conn} refused {who}: {_AUTH_CODES[code]} (LABTWIN_BROKER_USERNAME / "
            "LABTWIN_BROKER_PASSWORD, or the identity's password file in the lab's security profile)"
        )
    text = str(exc)
    if "SSL" in text or "certificate" in text.lower() or "handshake" in text.lower():
        reason = text.split("] ", 1)[-1].split(" (_ssl", 1)[0]
        if "CERTIFICATE_REQUIRED" in text or "certificate required" in text:
            hint = "the broker wants a client certificate (LABTWIN_TLS_CERT / LABTWIN_TLS_KEY, or the identity's cert:)"
        elif "ALERT_UNKNOWN_CA" in text or "ALERT_BAD_CERTIFICATE" in text:
            hint = (
                "the broker does not accept this client certificate: LABTWIN_TLS_CERT / LABTWIN_TLS_KEY (or the "
                "identity's cert: and key:) must be the ones `labtwin lab secure` made for this lab"
            )
        else:
            hint = "check LABTWIN_TLS_CA (or the profile's ca:) and that the broker's certificate names this host"
        return BrokerRefused(f"TLS with the MQTT broker at {conn} failed: {reason}; {hint}")
    return None


class _PahoLog(logging.LoggerAdapter):
    """paho's log lines, passed on to aiomqtt's ``mqtt`` logger, keeping the last TLS error seen on the socket.

    A broker that refuses the client's certificate does so after a TLS 1.3 client has finished its handshake:
    paho only logs the alert ("failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] ...") and aiomqtt
    reports the connect as "Operation timed out". Kept here, the alert becomes the one-line refusal; before the
    first connection it is logged at debug level only, since the refusal says it.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("mqtt"), {})
        self.tls_error: str | None = None
        self.quiet = True  # until the first connection

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level < logging.INFO and not self.logger.isEnabledFor(level):
            # paho logs every packet at debug level ("Sending PUBACK (Mid: 12)"): formatting each one for nobody cost
            # 2 % of the recorder. No TLS error is among them (paho logs those at error level), so none is missed.
            return
        text = str(msg) % args if args else str(msg)
        if "[SSL" in text:
            self.tls_error = text
        if self.quiet:
            # Before the first connection a socket error ("EOF occurred in violation of protocol", what a loaded
            # TLS handshake cut off by the broker also says) is for the refusal or BrokerUnreachable to name.
            level = min(level, logging.DEBUG)
        super().log(level, msg, *args, **kwargs)


def _matches(filter_: str, topic_name: str) -> bool:
    fparts, tparts = filter_.split("/"), topic_name.split("/")
    for i, part in enumerate(fparts):
        if part == "#":
            return True
        if i >= len(tparts):
            return False
        if part != "+" and part != tparts[i]:
            return False
    return len(fparts) == len(tparts)


class Bus:
    """One MQTT connection with an outbox, a reconnect loop and decoded subscriptions.

    ``replay_state``: a file where the commands seen within the lab's clock-skew window are kept (an agent's),
    so a restart does not let a captured command be replayed to it.

    ``persistent=True`` asks the broker to keep this client's session (and its
    QoS 1 messages) while it is briefly away; it needs a stable client_id.
    """

    def __init__(
        self,
        url: str | BrokerConnection,
        client_id: str | None = None,
        *,
        will: tuple[str, bytes] | None = None,
        persistent: bool = False,
        outbox_size: int = 10_000,
        inflight_window: int = 64,
        connect_timeout_s: float = 10.0,
        attempt_timeout_s: float = 2.0,
        io_timeout_s: float = 30.0,
        keepalive_s: int = 15,
        replay_state: Path | None = None,
    ) -> None:
        self.connection = BrokerConnection.parse(url)
        self.address = self.connection  # str() is the URL without its password
        self._transport = resolve_transport(self.connection)
        self.client_id = client_id or f"labtwin-{uuid.uuid4().hex[:12]}"
        self.refusals: deque[Refusal] = deque(maxlen=100)
        self.on_refusal: Callable[[Refusal], None] | None = None
        self.on_reconnect: Callable[[], None] | None = None
        """Called on the event loop after every reconnect (once re-subscribed), e.g. to publish a status afresh."""
        self._gave_up: BaseException | None = None
        self._warned_unverified = False
        if replay_state is not None and self._transport.verifier is not None:
            self._transport.verifier.state_file = replay_state
            self._transport.verifier.load_state()
        self._done = asyncio.Event()
        self.will = will
        self.persistent = persistent
        self.stats = BusStats()
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=outbox_size)
        self._inflight: OrderedDict[int, _Outgoing] = OrderedDict()
        self._window = inflight_window
        self._ids = itertools.count()
        self._subs: list[Subscription] = []
        # Topic name -> the subscriptions it goes to: matching every filter of every subscription per message cost
        # the recorder 2.4 % of its CPU. Emptied whenever the subscriptions change, and when it holds _TARGETS_MAX
        # names (a publisher that makes up topic names must not grow it without bound).
        self._targets: dict[str, list[Subscription]] = {}
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self._manager: asyncio.Task | None = None
        self._connect_timeout_s = connect_timeout_s
        # aiomqtt has one timeout for everything; it is the connect timeout here, kept short so a
        # CONNECT the broker never answers (seen with amqtt under concurrent connects) is retried
        # several times within connect_timeout_s. Subscribe and publish pass their own, longer one.
        self._attempt_timeout_s = attempt_timeout_s
        self._io_timeout_s = io_timeout_s
        self._keepalive_s = keepalive_s
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Bus:
        self._manager = asyncio.create_task(self._run(), name=f"bus-{self.client_id}")
        try:
            await asyncio.wait_for(self._wait_connected_or_refused(), self._connect_timeout_s)
        except TimeoutError:
            await self.close(flush_timeout_s=0)
            raise BrokerUnreachable(
                f"cannot reach the MQTT broker at {self.address} within {self._connect_timeout_s:.0f} s: "
                "start it, or omit --broker to use the embedded one"
            ) from None
        if self._gave_up is not None:
            await self.close(flush_timeout_s=0)
            raise self._gave_up
        return self

    async def _wait_connected_or_refused(self) -> None:
        connected = asyncio.ensure_future(self._connected.wait())
        done = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait([connected, done], return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            done.cancel()

    @property
    def identity(self) -> str | None:
        """Who this bus publishes as (its signing identity), None where the lab does not sign."""
        return self._transport.signer.sender if self._transport.signer is not None else None

    @property
    def username(self) -> str | None:
        """The broker user this bus connects as (its ACL decides what the broker lets through)."""
        return self._transport.username

    @property
    def signed(self) -> bool:
        """True when this bus signs what it publishes (the lab has a security profile with this identity)."""
        return self._transport.signer is not None

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every message handed to publish() has its PUBACK. True if it did in time."""
        try:
            await asyncio.wait_for(self._wait_idle(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _wait_idle(self) -> None:
        while self._outbox.qsize() or self._inflight:
            self._idle.clear()
            await self._idle.wait()

    async def close(self, flush_timeout_s: float = 30.0) -> None:
        if self._manager is None:
            return
        if flush_timeout_s > 0 and self._connected.is_set():
            if not await self.flush(flush_timeout_s):
                log.warning(
                    "bus %s closed with %d unsent messages", self.client_id, self._outbox.qsize() + len(self._inflight)
                )
        self._closing = True
        self._manager.cancel()
        try:
            await self._manager
        except (asyncio.CancelledError, Exception):
            pass
        self._manager = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ publish / subscribe

    async def publish(self, topic_name: str, payload: BaseModel | bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; it is sent (and re-sent after a reconnect) until the broker acknowledges it.
        Blocks only when the outbox is full: that is the back-pressure on a fast producer."""
        data = payload if isinstance(payload, (bytes, bytearray)) else encode(payload)
        if self._transport.signer is not None:
            data = self._transport.signer.seal(topic_name, bytes(data))
        self._idle.clear()
        await self._outbox.put(_Outgoing(next(self._ids), topic_name, bytes(data), qos, retain))

    async def subscribe(self, filters: str | Iterable[str]) -> Subscription:
        """Documents on these topic filters (and retained ones), decoded by topic kind.

        Returns once the broker has acknowledged the subscription, so nothing
        published afterwards is missed; while disconnected, the filters are
        subscribed on the next connect."""
        fs = (filters,) if isinstance(filters, str) else tuple(filters)
        sub = Subscription(self, fs)
        self._subs.append(sub)
        self._targets.clear()
        if self._client is not None and self._connected.is_set():
            for f in fs:
                await self._subscribe_now(f)
        return sub

    async def _subscribe_now(self, filter_: str) -> None:
        try:
            if self._client is not None:
                await self._client.subscribe(filter_, qos=1, timeout=self._io_timeout_s)
        except aiomqtt.MqttError as exc:  # re-subscribed on the next connect anyway
            log.debug("subscribe %s deferred: %s", filter_, exc)

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)
            self._targets.clear()

    # ------------------------------------------------------------------ connection loop

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        finally:
            self._done.set()

    async def _connection_loop(self) -> None:
        backoff_s = 0.2
        first = True
        connected_at: float | None = None
        lost_at: float | None = None
        transport = self._transport
        paho_log = _PahoLog()
        while not self._closing:
            try:
                will = None
                if self.will is not None:
                    payload = self.will[1]
                    if transport.signer is not None:  # signed afresh at every connect
                        payload = transport.signer.seal(self.will[0], payload)
                    will = aiomqtt.Will(self.will[0], payload, qos=1, retain=True)
                paho_log.tls_error = None
                async with aiomqtt.Client(
                    transport.host,
                    transport.port,
                    identifier=self.client_id,
                    username=transport.username,
                    password=transport.password,
                    tls_context=transport.tls_context,
                    clean_session=not self.persistent,
                    will=will,
                    keepalive=self._keepalive_s,
                    timeout=self._attempt_timeout_s,
                    max_queued_outgoing_messages=None,
                    logger=cast(logging.Logger, paho_log),
                ) as client:
                    client.pending_calls_threshold = 10 * self._window  # silence per-publish warnings
                    self._client = client
                    filters = sorted({f for s in self._subs for f in s.filters})
                    for f in filters:
                        await client.subscribe(f, qos=1, timeout=self._io_timeout_s)
                    reconnected = not first
                    if reconnected:
                        self.stats.reconnects += 1
                        # As loud as the loss it ends: a log that shows only warnings must show the way back too.
                        down_s = time.monotonic() - lost_at if lost_at is not None else 0.0
                        log.warning("bus %s reconnected to %s after %.1f s", self.client_id, self.address, down_s)
                        lost_at = None
                    first = False
                    paho_log.quiet = False
                    backoff_s = 0.2
                    self._connected.set()
                    connected_at = time.monotonic()
                    if reconnected and self.on_reconnect is not None:
                        try:
                            self.on_reconnect()
                        except Exception:  # a hook must not take the connection down
                            log.exception("bus %s: its reconnect hook failed", self.client_id)
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._send_loop(client, tg))
                        tg.create_task(self._receive_loop(client))
            except* aiomqtt.MqttError as group:
                self._connected.clear()
                self._client = None
                lost: BaseException | None = group.exceptions[0]
                if paho_log.tls_error is not None:  # what the socket said, not aiomqtt's "Operation timed out"
                    lost = aiomqtt.MqttError(paho_log.tls_error)
            else:
                lost = None
            finally:
                self._connected.clear()
                self._client = None
            if self._closing:
                return
            if connected_at is not None:
                self._note_session_length(time.monotonic() - connected_at)
                connected_at = None
            refused = _refusal(lost, self.connection, transport.username) if lost is not None else None
            if refused is not None and first:  # a wrong password or CA: say so once, do not retry
                self._gave_up = refused
                return
            if first:  # never connected yet: __aenter__ names the cause in one line if it lasts
                log.debug(
                    "bus %s: no connection to %s yet (%s); retrying in %.1f s",
                    self.client_id,
                    self.address,
                    lost,
                    backoff_s,
                )
            else:
                lost_at = lost_at or time.monotonic()
                log.warning(
                    "bus %s lost the broker at %s (%s); retrying in %.1f s",
                    self.client_id,
                    self.address,
                    lost,
                    backoff_s,
                )
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, 5.0)

    def _note_session_length(self, lasted_s: float) -> None:
        """A broker closes a connection when another client connects with the same client id (MQTT 3.1.1 says
        nothing more): connections that keep ending within seconds are said so, once, loudly."""
        if lasted_s >= SHORT_SESSION_S:
            self.stats.short_sessions = 0
            return
        self.stats.short_sessions += 1
        if self.stats.short_sessions == SHORT_SESSIONS_WARN:
            log.error(
                "bus %s: the broker at %s closed this connection %d times within %.0f s of connecting: another "
                "client may be using client id %r and taking its session over (see the broker's log)",
                self.client_id,
                self.address,
                SHORT_SESSIONS_WARN,
                SHORT_SESSION_S,
                self.client_id,
            )

    async def _send_loop(self, client: aiomqtt.Client, tg: asyncio.TaskGroup) -> None:
        window = asyncio.Semaphore(self._window)
        # First whatever was in flight when the last connection died, in order.
        for item in list(self._inflight.values()):
            await window.acquire()
            self.stats.resent += 1
            tg.create_task(self._publish_one(client, item, window))
        while True:
            item = await self._outbox.get()
            self._inflight[item.ident] = item  # before any await: never lost between queue and wire
            await window.acquire()
            tg.create_task(self._publish_one(client, item, window))

    async def _publish_one(self, client: aiomqtt.Client, item: _Outgoing, window: asyncio.Semaphore) -> None:
        try:
            await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain, timeout=self._io_timeout_s)
            self._inflight.pop(item.ident, None)
            self.stats.published += 1
        finally:
            window.release()
            if not self._inflight and self._outbox.empty():
                self._idle.set()

    async def _receive_loop(self, client: aiomqtt.Client) -> None:
        async for raw in client.messages:
            self.stats.received += 1
            name = raw.topic.value
            targets = self._targets.get(name)
            if targets is None:
                if len(self._targets) >= _TARGETS_MAX:
                    self._targets.clear()
                targets = self._targets[name] = [s for s in self._subs if any(_matches(f, name) for f in s.filters)]
            if not targets:
                continue
            payload = raw.payload if isinstance(raw.payload, (bytes, bytearray)) else str(raw.payload).encode()
            sender: str | None = None
            verifier = self._transport.verifier
            try:
                limit = MAX_PAYLOAD_BYTES + MAX_HEADER_BYTES + len(MAGIC)
                if len(payload) > limit:  # before any signature work
                    raise MalformedPayload(
                        f"{name}: payload of {len(payload)} bytes is over labtwin's limit of {limit} bytes "
                        f"({MAX_PAYLOAD_BYTES // (1024 * 1024)} MiB of document and its signature)"
                    )
                if verifier is not None:
                    trusted = verifier.check(name, bytes(payload))
                    payload, sender = trusted.body, trusted.sender
                    doc = decode(name, payload)
                    verifier.admit(name, trusted, doc)
                else:
                    if is_sealed(payload):  # a signed lab read by a process without its profile: unverified
                        if not self._warned_unverified:
                            self._warned_unverified = True
                            log.warning(
                                "bus %s reads signed documents without the lab's security profile: nothing it "
                                "receives is verified (give --lab or LABTWIN_SECURITY)",
                                self.client_id,
                            )
                        payload = open_envelope(bytes(payload)).body
                    doc = decode(name, payload)
            except Duplicate:
                self.stats.duplicates += 1
                continue
            except Refused as exc:
                self._refuse(Refusal(name, exc.sender, exc.reason))
                continue
            except (MalformedPayload, BadSignature) as exc:
                self.stats.malformed += 1
                log.warning("skipped a malformed payload: %s", exc)
                continue
            message = Message(name, doc, sender)
            for sub in targets:
                sub._offer(message)

    def _refuse(self, refusal: Refusal) -> None:
        self.stats.refused += 1
        self.refusals.append(refusal)
        log.warning(
            "refused a payload on %s from %s: %s", refusal.topic, refusal.sender or "an unsigned sender", refusal.reason
        )
        if self.on_refusal is not None:
            self.on_refusal(refusal)
