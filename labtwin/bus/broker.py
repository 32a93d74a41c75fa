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

import logging
import socket

from amqtt.broker import Broker


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

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.ERROR)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}},
        }
        self._broker = Broker(config)
        self._broker._subscriptions = _SnapshotDict()
        await self._broker.start()
        return self

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
