"""The embedded MQTT broker: labtwin's zero-set-up default.

amqtt runs in-process under asyncio (starts in ~30 ms here) and aiomqtt talks
to it at about half of Mosquitto's rate, plenty for a laptop's channels
(bench/bus_throughput.py). Its defaults are not what a lab wants, so every
choice is explicit: bind loopback only, no plugins but authentication, and a
username required, because amqtt drops queued messages for persistent
sessions of anonymous clients (DESIGN.md). Any username is accepted: the
embedded broker is for one machine; a lab network uses Mosquitto with TLS,
passwords and ACLs instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

from amqtt.broker import Broker

from labtwin.security.connection import is_loopback

log = logging.getLogger(__name__)

SHUTDOWN_S = 5.0
"""How long the embedded broker's shutdown may take after its clients were cut off."""

LOOPBACK_NOTE = "loopback only, no TLS, any username: for one machine (a lab network: `labtwin lab secure`)"


class BrokerSetupError(ValueError):
    """An embedded broker asked to do what it cannot do safely; the message says what to use instead."""


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """amqtt's password file (user:argon2-hash per line) for the embedded broker beyond loopback."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = PasswordHash((Argon2Hasher(),))
    lines = [f"{user}:{hasher.hash(password)}" for user, password in sorted(users.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _SnapshotDict(dict):
    """amqtt 0.12.1's subscription table, iterated over a snapshot.

    amqtt iterates this dict across awaits (publishing retained messages to a connecting session, routing
    every broadcast); a client that subscribes meanwhile raised "dictionary changed size during iteration"
    and its connection was dropped: 129 of them when bench/campaign.py's 64 flows connected at once. Every
    one of those loops means "the subscriptions as they are now", which is what a snapshot gives."""

    def __iter__(self):
        return iter(list(super().keys()))

    def items(self):
        return list(super().items())


class EmbeddedBroker:
    """``async with EmbeddedBroker() as broker: broker.url`` -> mqtt://127.0.0.1:<free port>."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, password_file: Path | None = None) -> None:
        if not is_loopback(host) and password_file is None:
            raise BrokerSetupError(
                f"the embedded broker on {host} would let anyone on the network command the cells: give "
                "--password-file (labtwin lab secure writes passwd.amqtt), or keep it on 127.0.0.1; for TLS and "
                "per-role ACLs run Mosquitto with the files labtwin lab secure writes"
            )
        if password_file is not None and not Path(password_file).is_file():
            raise BrokerSetupError(
                f"--password-file {password_file}: no such file (labtwin lab secure writes passwd.amqtt)"
            )
        self.host = host
        self.port = port or free_port(host)
        self.password_file = password_file
        self._broker: Broker | None = None

    @property
    def protection(self) -> str:
        """What this broker does and does not protect, for its start-up line."""
        if self.password_file is None:
            return LOOPBACK_NOTE
        return f"users of {self.password_file} only; no TLS and no ACL: passwords cross the network in clear"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        auth: dict[str, dict] = (
            {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}}
            if self.password_file is None
            else {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(self.password_file)}}
        )
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}, "plugins": auth}
        self._broker = Broker(config)
        self._broker._subscriptions = _SnapshotDict()
        await self._broker.start()
        return self

    async def stop(self) -> None:
        """Stop at once, as a broker that is shut down drops its clients: every client connection is aborted
        first, then amqtt shuts down, bounded by SHUTDOWN_S.

        amqtt's own shutdown stops each client's handler and waits for its reader; a client whose connection
        was busy (an agent sending hundreds of batches a second into a full queue) kept that wait from ending
        for over 30 s (tests/test_spool.py, loaded), and `labtwin broker` ignored Ctrl-C as long."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        for _session, handler in list(getattr(broker, "_sessions", {}).values()):
            for stream in (getattr(handler, "writer", None), getattr(handler, "reader", None)):
                transport = getattr(getattr(stream, "_writer", None), "transport", None)
                if transport is not None:
                    transport.abort()
        try:
            await asyncio.wait_for(broker.shutdown(), SHUTDOWN_S)
        except TimeoutError:
            log.warning("embedded broker: shutdown took over %.0f s; its listening sockets closed", SHUTDOWN_S)
            for server in getattr(broker, "_servers", {}).values():
                instance = getattr(server, "instance", None)
                if instance is not None:
                    instance.close()

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
