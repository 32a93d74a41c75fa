"""What a receiver trusts: which identity may publish on which topic, and commands never replayed.

The table is the ACL ``labtwin lab secure`` gives Mosquitto, checked again at every receiver so a
misconfigured broker does not hand a cell to whoever reaches it:

- a channel's ``data``, ``event`` and ``status``: only that channel's agent;
- a channel's ``cmd``: the orchestrator, an operator, or the twin (its anomaly policy pauses and stops);
- a cell's ``state`` and ``anomaly``: the twin.

Commands (and statuses) also carry freshness: a nonce not above the last one seen from that sender on that topic is a
replay (the same nonce again is QoS 1's redelivery and is dropped quietly), and one further than the
profile's ``max_clock_skew_s`` from this machine's clock is refused, which bounds what a replay can do
after an agent restarts and forgets the nonces it saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from labtwin.security.profile import Role, SecurityProfile
from labtwin.security.signing import BadSignature, is_sealed, load_public_key, open_envelope, verify

_ROOT = ("labtwin", "v1")
COMMANDERS = frozenset({Role.orchestrator, Role.operator, Role.twin})


class Refused(ValueError):
    """A document a receiver will not act on; ``sender`` is who it claims to be from (None: unsigned)."""

    def __init__(self, reason: str, sender: str | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sender = sender


class Duplicate(Exception):
    """A command seen before with the same nonce: MQTT's at-least-once redelivery, not an attack."""


@dataclass(frozen=True)
class Trusted:
    body: bytes
    sender: str | None  # None only where signing is off and the payload came unsigned
    nonce: int | None


def topic_parts(topic: str) -> tuple[str, str, str, str] | None:
    """(lab, scope, name, kind): scope 'channel' or 'cell'; None for a topic outside labtwin's scheme."""
    parts = topic.split("/")
    if tuple(parts[:2]) != _ROOT:
        return None
    if len(parts) == 5:
        return parts[2], "channel", parts[3], parts[4]
    if len(parts) == 6 and parts[3] == "cells":
        return parts[2], "cell", parts[4], parts[5]
    return None


def may_publish(role: Role, own_channel: str | None, scope: str, name: str, kind: str) -> bool:
    if scope == "cell":
        return role is Role.twin and kind in {"state", "anomaly"}
    if kind == "cmd":
        return role in COMMANDERS
    if kind in {"data", "event", "status"}:
        return role is Role.agent and own_channel == name
    return False


class Verifier:
    """Checks every payload a bus receives against the lab's profile."""

    def __init__(self, profile: SecurityProfile) -> None:
        self.profile = profile
        self._keys: dict[str, Ed25519PublicKey] = {
            name: load_public_key(entry.public_key)
            for name, entry in profile.identities.items()
            if entry.public_key is not None
        }
        self._last_command: dict[tuple[str, str], int] = {}
        self._skew_ns = int(profile.max_clock_skew_s * 1e9)

    def check(self, topic: str, payload: bytes) -> Trusted:
        """The trusted body, or Refused (and Duplicate for a redelivered command)."""
        if not is_sealed(payload):
            if self.profile.required:
                raise Refused("unsigned (this lab requires signed documents)", None)
            return Trusted(payload, None, None)
        try:
            envelope = open_envelope(payload)
        except BadSignature as exc:
            raise Refused(str(exc), None) from None
        sender = envelope.sender
        key = self._keys.get(sender)
        if key is None:
            raise Refused(f"unknown sender {sender!r} (not in {self.profile.source or 'the security profile'})", sender)
        try:
            verify(key, topic, envelope)
        except BadSignature as exc:
            raise Refused(str(exc), sender) from None
        parts = topic_parts(topic)
        entry = self.profile.identities[sender]
        if parts is None or parts[0] != self.profile.lab:
            raise Refused(f"topic {topic} is not lab {self.profile.lab!r}'s", sender)
        _, scope, name, kind = parts
        if not may_publish(entry.role, entry.channel, scope, name, kind):
            raise Refused(f"{sender!r} ({entry.role.value}) may not publish on {topic}", sender)
        if kind == "cmd":
            self._fresh(topic, sender, envelope.nonce)
        elif kind == "status":
            self._newer(topic, sender, envelope.nonce, "status")
        return Trusted(envelope.body, sender, envelope.nonce)

    def _fresh(self, topic: str, sender: str, nonce: int) -> None:
        now = time.time_ns()
        if abs(now - nonce) > self._skew_ns:
            raise Refused(
                f"stale or future command from {sender!r} ({(now - nonce) / 1e9:+.0f} s against this clock, "
                f"more than {self.profile.max_clock_skew_s:.0f} s)",
                sender,
            )
        self._newer(topic, sender, nonce, "command")

    def _newer(self, topic: str, sender: str, nonce: int, what: str) -> None:
        """A status may be old (it is retained), but never older than one already seen from its agent."""
        last = self._last_command.get((sender, topic), 0)
        if nonce == last:
            if what == "status":  # the retained status again, for a new subscription on this bus: deliver it
                return
            raise Duplicate()
        if nonce < last:
            raise Refused(f"replayed {what} from {sender!r} (nonce {nonce} is older than {last})", sender)
        self._last_command[(sender, topic)] = nonce
