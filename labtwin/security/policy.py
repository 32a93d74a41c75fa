"""What a receiver trusts: which identity may publish on which topic, and commands never replayed.

The table is the ACL ``labtwin lab secure`` gives Mosquitto, checked again at every receiver so a
misconfigured broker does not hand a cell to whoever reaches it:

- a channel's ``data``, ``event`` and ``status``: only that channel's agent;
- a channel's ``cmd``: the orchestrator, an operator, or the twin (its anomaly policy pauses and stops), and
  the recorder, whose only command is a ResendRequest (the batches its store misses, from the agent's spool);
- a cell's ``state`` and ``anomaly``: the twin.

Commands also carry freshness: one further than the profile's ``max_clock_skew_s`` from this machine's
clock is refused, and one whose nonce was seen within that window is a replay (the same bytes again are
QoS 1's redelivery and are dropped quietly). An agent keeps the window's nonces on disk, so a restart does
not reopen it. Each role gives only its commands (the twin pauses and stops; only the orchestrator starts
runs and sources current), and a document speaks only for its own channel or cell (``admit``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from labtwin.security.profile import Role, SecurityProfile
from labtwin.security.signing import BadSignature, is_sealed, load_public_key, open_envelope, verify

log = logging.getLogger(__name__)
_ROOT = ("labtwin", "v1")
COMMANDERS = frozenset({Role.orchestrator, Role.operator, Role.twin, Role.recorder})
RESEND_WINDOW_NS = 30 * 10**9
"""A command seen again within this long is a resend (after a reconnect, or QoS 1's redelivery): dropped
quietly. Later it is a replay: refused and reported."""


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


COMMANDS_OF: dict[Role, frozenset[str]] = {
    Role.orchestrator: frozenset({"start_run", "step", "stop_run", "pause_run", "resume_run", "end_step"}),
    Role.operator: frozenset({"stop_run", "pause_run", "resume_run", "end_step"}),
    Role.twin: frozenset({"stop_run", "pause_run"}),  # an anomaly policy's actions, never current
    Role.recorder: frozenset({"resend"}),  # gap filling from the agent's spool: never moves the cell
}
"""Which commands each commanding role may give: only the orchestrator starts runs and sources current."""


def may_command(role: Role, command_kind: str) -> bool:
    return command_kind in COMMANDS_OF.get(role, frozenset())


def _channel_of(document: object) -> str | None:
    value = getattr(document, "channel", None)
    return value if isinstance(value, str) else None


class Verifier:
    """Checks every payload a bus receives against the lab's profile.

    ``check`` works on bytes (signature, sender, topic permission, command freshness); ``admit`` on the
    decoded document (the command's kind against the sender's role, the document's own channel or cell
    against its topic's, a status never older than one seen). ``state_file`` keeps the commands seen
    within the skew window across restarts (an agent's), so a captured command cannot be replayed to an
    agent that has just restarted.
    """

    def __init__(self, profile: SecurityProfile, state_file: Path | None = None) -> None:
        self.profile = profile
        self._keys: dict[str, Ed25519PublicKey] = {
            name: load_public_key(entry.public_key)
            for name, entry in profile.identities.items()
            if entry.public_key is not None
        }
        self._seen_commands: dict[str, dict[int, int]] = {}  # "sender topic" -> {nonce: first seen, ns}
        self._last_status: dict[tuple[str, str], int] = {}
        self._skew_ns = int(profile.max_clock_skew_s * 1e9)
        self.state_file = state_file
        if state_file is not None:
            self.load_state()

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
        return Trusted(envelope.body, sender, envelope.nonce)

    def admit(self, topic: str, trusted: Trusted, document: object) -> None:
        """Refused unless the decoded document is one its sender may send on this topic."""
        sender = trusted.sender
        parts = topic_parts(topic)
        if sender is None or parts is None:
            return  # unsigned in a lab that does not require signing: nothing to hold it to
        _, scope, name, kind = parts
        role = self.profile.identities[sender].role
        if kind == "cmd":
            command = getattr(document, "kind", "?")
            if not may_command(role, command):
                raise Refused(f"{sender!r} ({role.value}) may not give a {command} command", sender)
            return
        own = getattr(document, "cell", None) if scope == "cell" else _channel_of(document)
        if own is not None and own != name:
            raise Refused(f"a document for {scope} {own!r} on {topic}: a sender speaks only for its own", sender)
        if kind == "status" and trusted.nonce is not None:
            self._status_order(topic, sender, trusted.nonce, document)

    def _status_order(self, topic: str, sender: str, nonce: int, document: object) -> None:
        """A status may be old (it is retained), but never older than one already seen from its agent, except
        its "offline": the last will, signed when the agent connected, is older than the statuses after it
        (a replayed "offline" of a live agent is answered by the agent itself, which re-asserts)."""
        if getattr(getattr(document, "state", None), "value", None) == "offline":
            return
        key = (sender, topic)
        last = self._last_status.get(key, 0)
        if nonce < last:
            raise Refused(f"replayed status from {sender!r} (nonce {nonce} is older than {last})", sender)
        self._last_status[key] = nonce

    def _fresh(self, topic: str, sender: str, nonce: int) -> None:
        """Within the skew window of this clock, and never seen before. A set of the window's nonces rather than
        "newer than the last": one identity may command from several machines (operators, campaign workers)."""
        now = time.time_ns()
        if abs(now - nonce) > self._skew_ns:
            raise Refused(
                f"stale or future command from {sender!r} ({(now - nonce) / 1e9:+.0f} s against this clock, "
                f"more than {self.profile.max_clock_skew_s:.0f} s)",
                sender,
            )
        seen = self._seen_commands.setdefault(f"{sender} {topic}", {})
        first_seen = seen.get(nonce)
        if first_seen is not None:
            if now - first_seen <= RESEND_WINDOW_NS:  # a publisher's resend after a reconnect, or QoS 1's
                raise Duplicate()
            raise Refused(f"replayed command from {sender!r} (first seen {(now - first_seen) / 1e9:.0f} s ago)", sender)
        for old in [n for n in seen if now - n > self._skew_ns]:
            del seen[old]
        seen[nonce] = now
        if self.state_file is not None:
            self._save_state()

    def load_state(self) -> None:
        if self.state_file is None:
            return
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
            self._seen_commands = {str(k): {int(n): int(t) for n, t in v.items()} for k, v in data.items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Unreadable state: refuse every command signed before now rather than accept replays.
            self._seen_commands = {}
            self._skew_ns = 0
            log.warning("replay state %s unreadable (%s): commands signed before now are refused", self.state_file, exc)

    def _save_state(self) -> None:
        assert self.state_file is not None
        tmp = self.state_file.with_suffix(".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._seen_commands), encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("replay state %s not saved: %s", self.state_file, exc)
