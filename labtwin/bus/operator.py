"""An operator's hand on a running channel: pause, resume and stop, each confirmed by the agent or refused.

A command is done when the channel's agent says so (its status, or the run's RunStop), not when the broker
took it: a broker whose ACL denies the operator still acknowledges an MQTT 3.1.1 publish and drops it,
and an agent in a signed lab refuses a command it cannot verify with a security event. Either way the
operator reads one line saying the command was refused (``CommandFailed.refused``). The command line
(``labtwin pause``) and the dashboard's operator buttons both send through here.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from labtwin.bus import topics
from labtwin.bus.client import Bus
from labtwin.documents import ChannelState, ChannelStatus, PauseRun, ResumeRun, RunStop, SecurityEvent, StopRun
from labtwin.security import BrokerConnection, as_identity


class CommandFailed(Exception):
    """The order was not carried out: ``refused`` when the broker or the agent would not take it (a user with
    the wrong role, a signature the agent cannot verify), else there was nothing to command."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class Order:
    """What to send for the channel's run, and how the agent shows it was done."""

    verb: str  # pause, resume, stop
    make: Callable[[str], BaseModel]
    done: Callable[[BaseModel, str], bool]


def paused(doc: BaseModel, run_id: str) -> bool:
    return isinstance(doc, ChannelStatus) and doc.run_id == run_id and doc.state is ChannelState.paused


def running(doc: BaseModel, run_id: str) -> bool:
    return isinstance(doc, ChannelStatus) and doc.run_id == run_id and doc.state is ChannelState.running


def stopped(doc: BaseModel, run_id: str) -> bool:
    if isinstance(doc, RunStop):
        return doc.run_id == run_id
    return isinstance(doc, ChannelStatus) and doc.run_id != run_id and doc.state is not ChannelState.offline


def pause_order(reason: str = "operator") -> Order:
    return Order("pause", lambda rid: PauseRun(run_id=rid, reason=reason), paused)


def resume_order() -> Order:
    return Order("resume", lambda rid: ResumeRun(run_id=rid), running)


def stop_order(reason: str = "stopped by operator") -> Order:
    return Order("stop", lambda rid: StopRun(run_id=rid, exit_status="aborted", reason=reason), stopped)


ORDERS: dict[str, Callable[[str], Order]] = {
    "pause": pause_order,
    "resume": lambda _reason: resume_order(),
    "stop": stop_order,
}


async def command_channel(
    url: str | BrokerConnection,
    lab: str,
    channel: str,
    order: Order,
    timeout_s: float = 10.0,
    ack_timeout_s: float = 10.0,
) -> str:
    """Send ``order`` for the run now on a channel and wait for its agent to carry it out; the run id."""
    connection = as_identity(url, "operator")
    client_id = f"operator-{order.verb}-{channel}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    async with Bus(connection, client_id) as bus:
        status_sub = await bus.subscribe(topics.topic(lab, channel, "status"))
        try:
            status = (await status_sub.get(timeout_s)).document
        except TimeoutError:
            raise CommandFailed(
                f"no status from channel {channel} of lab {lab} on {connection}: is its agent running?"
            ) from None
        if not isinstance(status, ChannelStatus) or not status.run_id:
            raise CommandFailed(
                f"channel {channel} has no run to {order.verb} (state {getattr(getattr(status, 'state', None), 'value', '?')})"
            )
        run_id = status.run_id
        answers = await bus.subscribe([topics.topic(lab, channel, "status"), topics.topic(lab, channel, "event")])
        status_sub.close()
        await bus.publish(topics.topic(lab, channel, "cmd"), order.make(run_id))
        await bus.flush()
        deadline = asyncio.get_running_loop().time() + ack_timeout_s
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await answers.get(max(remaining, 0.0)) if remaining > 0 else None
            except TimeoutError:
                message = None
            if message is None:
                raise CommandFailed(
                    f"{order.verb} of run {run_id} on {channel} was not acknowledged by its agent within "
                    f"{ack_timeout_s:.0f} s: the broker may have refused the publish of user {bus.username!r} "
                    "(its ACL lets only an operator or the orchestrator command a channel), or the agent "
                    "is not running",
                    refused=True,
                )
            doc = message.document
            # Only a refusal of this process's own signed command counts: an unsigned one may be anyone's.
            mine = bus.identity is not None and doc.sender == bus.identity if isinstance(doc, SecurityEvent) else False
            if isinstance(doc, SecurityEvent) and doc.topic.endswith("/cmd") and mine:
                raise CommandFailed(
                    f"{order.verb} of run {run_id} on {channel} refused by its agent: {doc.reason}", refused=True
                )
            if order.done(doc, run_id):
                return run_id
