"""Bytes <-> documents: which document each topic kind carries, and how a bad payload is reported."""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter, ValidationError

from labtwin.documents.base import MAX_PAYLOAD_BYTES
from labtwin.documents.commands import Command
from labtwin.documents.data import Event, SampleBatch
from labtwin.documents.status import ChannelState, ChannelStatus
from labtwin.documents.twin import Anomaly, CellState

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


_STATUS_ADAPTER = TypeAdapter(ChannelStatus)
_DATA_ADAPTER = TypeAdapter(SampleBatch)
_ADAPTERS: dict[str, TypeAdapter] = {
    "cmd": COMMAND_ADAPTER,
    "event": EVENT_ADAPTER,
    "data": _DATA_ADAPTER,
    "status": _STATUS_ADAPTER,
    "state": TypeAdapter(CellState),
    "anomaly": TypeAdapter(Anomaly),
}


class MalformedPayload(ValueError):
    """A payload on a labtwin topic that is not the document that topic carries."""


def _printable(text: object, limit: int) -> str:
    """``text`` for a log line: as it is when short and printable, else quoted, escaped and cut. A rejection names
    the topic and the field, and both come from the sender: a key like "x\\nERROR ..." must not forge a log line."""
    text = str(text)
    if len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def decode(topic_name: str, payload: bytes) -> BaseModel:
    """The document a payload carries, chosen by the topic's last level."""
    kind = topic_name.rsplit("/", 1)[-1]
    adapter = _ADAPTERS.get(kind)
    topic_name = _printable(topic_name, 200)
    if adapter is None:
        raise MalformedPayload(f"{topic_name}: no labtwin document is defined for topic kind {kind[:40]!r}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedPayload(
            f"{topic_name}: payload of {len(payload)} bytes is over labtwin's {MAX_PAYLOAD_BYTES} "
            "(send smaller batches)"
        )
    try:
        return adapter.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(_printable(p, 40) for p in first.get("loc", ())) or "(payload)"
        raise MalformedPayload(f"{topic_name}: {where}: {_printable(first.get('msg'), 300)}") from None


def encode(document: BaseModel) -> bytes:
    return document.model_dump_json(exclude_none=False).encode()


def offline_status(channel: str) -> bytes:
    """The last will of an agent: published by the broker if the agent vanishes."""
    return encode(ChannelStatus(channel=channel, state=ChannelState.offline, message="agent connection lost"))
