"""Ed25519 signatures over a document, the topic it goes to and a monotonic nonce.

Wire format of a signed payload (one line of header, then the document exactly as encoded)::

    LTS1 {"by":"agent-ch1","n":1764650000123456789,"sig":"<base64>"}\\n{"v":1,"kind":"samples",...}

The signature covers the topic, the sender's name, the nonce and the document bytes, so a document
cannot be moved to another channel, claimed by another sender or replayed as new. The nonce is
nanoseconds since the epoch, strictly increasing per signer: a receiver can refuse what it has seen
and what is too old, with no state shared between machines but their clocks.
Ed25519 (RFC 8032) because it is deterministic, small (64-byte signatures) and fast in ``cryptography``.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAGIC = b"LTS1 "
_CONTEXT = b"labtwin-signature-v1\x00"
MAX_HEADER_BYTES = 512
_SENDER = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")


class BadSignature(ValueError):
    """A payload whose envelope is malformed or whose signature does not verify."""


@dataclass(frozen=True)
class Envelope:
    sender: str
    nonce: int
    signature: bytes
    body: bytes


def signed_bytes(topic: str, sender: str, nonce: int, body: bytes) -> bytes:
    return b"".join((_CONTEXT, topic.encode(), b"\x00", sender.encode(), b"\x00", str(nonce).encode(), b"\x00", body))


class Signer:
    """One identity's private key and its nonce counter."""

    def __init__(self, sender: str, key: Ed25519PrivateKey) -> None:
        self.sender = sender
        self._key = key
        self._last = 0
        self._lock = threading.Lock()  # agents sign from their step thread and their event loop

    @classmethod
    def from_file(cls, sender: str, path: Path) -> Signer:
        return cls(sender, load_private_key(path))

    def next_nonce(self) -> int:
        with self._lock:
            self._last = max(time.time_ns(), self._last + 1)
            return self._last

    def seal(self, topic: str, body: bytes) -> bytes:
        """The signed payload for ``body`` on ``topic``."""
        nonce = self.next_nonce()
        signature = self._key.sign(signed_bytes(topic, self.sender, nonce, body))
        header = json.dumps(
            {"by": self.sender, "n": nonce, "sig": base64.b64encode(signature).decode()}, separators=(",", ":")
        ).encode()
        return MAGIC + header + b"\n" + body


def is_sealed(payload: bytes) -> bool:
    return payload.startswith(MAGIC)


def open_envelope(payload: bytes) -> Envelope:
    """Split a signed payload into its header and body (the signature is checked by ``verify``)."""
    end = payload.find(b"\n", 0, len(MAGIC) + MAX_HEADER_BYTES)
    if not payload.startswith(MAGIC) or end < 0:
        raise BadSignature("not a signed payload (no 'LTS1 <header>' line)")
    try:
        header = json.loads(payload[len(MAGIC) : end])
        sender, nonce, signature = header["by"], header["n"], base64.b64decode(header["sig"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadSignature(f"signature header is malformed ({exc.__class__.__name__})") from None
    if not isinstance(sender, str) or not isinstance(nonce, int) or isinstance(nonce, bool) or len(signature) != 64:
        raise BadSignature("signature header is malformed (by: text, n: integer, sig: 64 bytes)")
    if not 0 < nonce < 2**63:
        raise BadSignature("signature nonce is out of range")
    if not _SENDER.match(sender):  # it reaches log lines and security events: no control characters, bounded
        raise BadSignature("signature header is malformed (by: 1-128 letters, digits, '_', '.', '-' or '@')")
    return Envelope(sender, nonce, signature, payload[end + 1 :])


def verify(key: Ed25519PublicKey, topic: str, envelope: Envelope) -> None:
    try:
        key.verify(envelope.signature, signed_bytes(topic, envelope.sender, envelope.nonce, envelope.body))
    except InvalidSignature:
        raise BadSignature(f"signature of {envelope.sender!r} does not verify") from None


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_public_key(b64: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(b64, validate=True))
    except ValueError as exc:
        raise ValueError(f"public_key is not a base64 Ed25519 key: {exc}") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"signing key {path}: cannot be read: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ValueError(f"signing key {path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path}: not an Ed25519 key (make one with `labtwin lab secure`)")
    return key
