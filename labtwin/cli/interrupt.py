"""Ctrl-C during ``labtwin run``: stop the run the way a flow stops one, so the store says what happened.

Cancelling the flow's task outright would leave the agent to find out by itself (its lease runs out) and
the store with a run that never ended. Instead the first SIGINT sends the channel's agent a ``StopRun``
(aborted, "interrupted: ..."): the agent switches the output off within one sample, ends the step and
publishes the ``RunStop`` the recorder stores, and the flow returns its summary as for any aborted run.
If the run has not started yet, or the agent does not answer in ``grace_s``, or Ctrl-C comes again, the
flow's task is cancelled (the flow then sends its own StopRun on the way out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from labtwin.data.store import describe_url
from labtwin.security import BrokerConnection, as_identity

T = TypeVar("T")
log = logging.getLogger(__name__)

INTERRUPTED_REASON = "interrupted: Ctrl-C (SIGINT) from the operator"


class RunInterrupted(Exception):
    """The operator stopped the run; the message is the one line the CLI prints."""


def new_run_id(channel: str) -> str:
    """A run id made here, so the interrupt knows which run to stop (the flow's own format)."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{channel}-{uuid.uuid4().hex[:6]}"


async def _send_stop(url: str | BrokerConnection, lab: str, channel: str, run_id: str) -> None:
    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import StopRun

    async with Bus(as_identity(url, "orchestrator"), f"cli-interrupt-{run_id}") as bus:
        await bus.publish(
            busmod.topic(lab, channel, "cmd"), StopRun(run_id=run_id, exit_status="aborted", reason=INTERRUPTED_REASON)
        )
        await bus.flush(5)


async def stop_on_interrupt(
    flow: Coroutine[Any, Any, T],
    url: str | BrokerConnection,
    lab: str,
    channel: str,
    run_id: str,
    store_url: str,
    stored: Callable[[str], Awaitable[None]] | None = None,
    grace_s: float = 30.0,
) -> T:
    """Await the flow; on SIGINT stop its run cleanly and raise RunInterrupted with the line to print."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(flow)
    interrupts = 0
    stopper: asyncio.Task | None = None

    def on_sigint() -> None:
        nonlocal interrupts, stopper
        interrupts += 1
        if interrupts == 1:
            stopper = asyncio.ensure_future(_send_stop(url, lab, channel, run_id))
            loop.call_later(grace_s, task.cancel)
        else:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - no signal handlers on this platform/thread
        return await task
    try:
        try:
            result = await task
            if interrupts == 0:
                return result
        except asyncio.CancelledError:
            if interrupts == 0:
                raise
        except Exception:
            if interrupts == 0:
                raise
            # A terminal's Ctrl-C reaches the whole process group: Prefect's local API dies with it and the
            # flow fails on its next call. The run was stopped above; the failure is the interrupt's echo.
            log.debug("the flow ended with an error after the interrupt", exc_info=True)
        if stopper is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stopper, 10)
        if stored is not None:
            with contextlib.suppress(Exception):  # best effort: the line below says where to look
                await stored(run_id)
        where = f"in {describe_url(store_url)}" if stored is not None else f"by lab {lab}'s recorder"
        raise RunInterrupted(
            f"interrupted: run {run_id} on channel {channel} stopped (output off) and marked "
            f"aborted ({INTERRUPTED_REASON}) {where}"
        )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
