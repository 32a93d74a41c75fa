"""Who may say what on a lab's bus: identities, credentials, TLS, signed documents, redacted secrets.

The broker is the first wall (TLS, passwords, per-role ACLs: ``labtwin lab secure`` writes them for
Mosquitto); this room is the second, for a broker that is misconfigured: every document is signed by
its sender's Ed25519 key over the topic and a monotonic nonce, and a receiver trusts only what the
lab's security profile says that sender may publish there (docs/decisions/0008-signed-documents.md).

The names below are imported when first asked for (PEP 562), not with the package: ``redact`` and
``log_redaction``, which every CLI command installs before anything else (``labtwin --help`` among them),
need only ``re``, while the connection and the profile pull pydantic, YAML, cryptography and the document
models. ``redact`` and ``redact_url`` stay eager: ``labtwin.security.redact`` is also a submodule's name,
and binding the function here first keeps ``from labtwin.security import redact`` the function whichever
is imported first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from labtwin.security.redact import redact, redact_url

if TYPE_CHECKING:
    from labtwin.security.connection import BrokerConnection, Transport, as_identity, resolve_transport
    from labtwin.security.profile import IdentityEntry, Role, SecurityProfile, SecurityProfileError, load_profile

_LAZY = {
    "BrokerConnection": "labtwin.security.connection",
    "Transport": "labtwin.security.connection",
    "as_identity": "labtwin.security.connection",
    "resolve_transport": "labtwin.security.connection",
    "IdentityEntry": "labtwin.security.profile",
    "Role": "labtwin.security.profile",
    "SecurityProfile": "labtwin.security.profile",
    "SecurityProfileError": "labtwin.security.profile",
    "load_profile": "labtwin.security.profile",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later look-ups are plain attribute reads
    return value


__all__ = [
    "BrokerConnection",
    "IdentityEntry",
    "Role",
    "SecurityProfile",
    "SecurityProfileError",
    "Transport",
    "as_identity",
    "load_profile",
    "redact",
    "redact_url",
    "resolve_transport",
]
