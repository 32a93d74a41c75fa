"""Who may say what on a lab's bus: identities, credentials, TLS, signed documents, redacted secrets.

The broker is the first wall (TLS, passwords, per-role ACLs: ``labtwin lab secure`` writes them for
Mosquitto); this room is the second, for a broker that is misconfigured: every document is signed by
its sender's Ed25519 key over the topic and a monotonic nonce, and a receiver trusts only what the
lab's security profile says that sender may publish there (docs/decisions/0008-signed-documents.md).
"""

from labtwin.security.connection import BrokerConnection, Transport, as_identity, resolve_transport
from labtwin.security.profile import IdentityEntry, Role, SecurityProfile, SecurityProfileError, load_profile
from labtwin.security.redact import redact, redact_url

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
