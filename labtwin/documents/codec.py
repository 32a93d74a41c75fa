"""Bytes <-> documents: which document each topic kind carries, and how a bad payload is reported."""

from __future__ import annotations

from pydantic import BaseModel, TypeAdapter, ValidationError

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


def decode(topic_name: str, payload: bytes) -> BaseModel:
    """The document a payload carries, chosen by the topic's last level."""
    kind = topic_name.rsplit("/", 1)[-1]
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        raise MalformedPayload(f"{topic_name}: no labtwin document is defined for topic kind {kind!r}")
    try:
        return adapter.validate_json(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "(payload)"
        raise MalformedPayload(f"{topic_name}: {where}: {first.get('msg')}") from None


def encode(document: BaseModel) -> bytes:
    return document.model_dump_json(exclude_none=False).encode()


def offline_status(channel: str) -> bytes:
    """The last will of an agent: published by the broker if the agent vanishes."""
    return encode(ChannelStatus(channel=channel, state=ChannelState.offline, message="agent connection lost"))
