"""The MQTT bus: topic scheme, a client that survives its broker, and the embedded broker."""

from labtwin.bus.client import *  # noqa: F403
from labtwin.bus.topics import *  # noqa: F403
from labtwin.documents.codec import MalformedPayload, decode, encode, offline_status  # noqa: F401
