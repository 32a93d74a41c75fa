"""No message that decodes stops a subscriber (issue 14): the twin service, the monitor and the recorder each get a
poison document, then a valid one, over a real broker; the subscriber is still alive and handled the valid one.

Each poison is one that stopped (or, for the recorder, still stops) the subscriber before: a RunStart on a channel
whose twin model cannot be made killed the twin service; a step label that rich reads as markup ("[/bold]") killed
the monitor at its next refresh; a step label with a NUL, which PostgreSQL's text refuses, fails the recorder's
store write."""

from __future__ import annotations

import asyncio
import io
import logging

from rich.console import Console

from labtwin import bus as busmod
from labtwin.bus import Bus, cell_topic
from labtwin.cli.monitor import MonitorView, monitor
from labtwin.cli.wiring import twin_factory
from labtwin.data.recorder import Recorder
from labtwin.data.store import Store
from labtwin.documents import CellState, ChannelState, ChannelStatus, RunStart, StepEvent, StepKind
from labtwin.twin.service import TwinService
from tests.helpers import sim_lab, wait_doc


def _start(lab: str, channel: str, run_id: str, cell_id: str) -> RunStart:
    return RunStart(run_id=run_id, lab=lab, channel=channel, cell_id=cell_id, protocol="p", n_steps=1)


def _ended(run_id: str, label: str, channel: str = "ch") -> StepEvent:
    return StepEvent(
        run_id=run_id, channel=channel, step_index=0, label=label, step=StepKind.rest, event="ended", time_s=1.0
    )


async def _until(predicate, timeout_s: float = 15.0) -> None:
    async def _wait() -> None:
        while not predicate():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(_wait(), timeout_s)


async def test_the_twin_service_skips_a_run_it_cannot_make_a_twin_for_and_follows_the_next(
    broker_url, unique_lab, caplog
):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    # The lab names a twin model for channel "bad" that does not exist: making its twin raises (a model error).
    service = TwinService(
        broker_url, twin_factory(lab, cells={"bad": "no-such-cell-model"}), unique_lab, client_id=f"twin-{unique_lab}"
    )
    stop = asyncio.Event()
    serving = asyncio.create_task(service.serve(stop))
    try:
        await service.wait_ready()
        async with Bus(broker_url, f"poison-{unique_lab}") as bus:
            states = await bus.subscribe(cell_topic(unique_lab, "good-cell", "state"))
            with caplog.at_level(logging.ERROR, logger="labtwin.twin.service"):
                await bus.publish(busmod.topic(unique_lab, "bad", "event"), _start(unique_lab, "bad", "r-bad", "bad"))
                await bus.publish(
                    busmod.topic(unique_lab, "ch", "event"), _start(unique_lab, "ch", "r-ok", "good-cell")
                )
                state = await wait_doc(states, lambda d: isinstance(d, CellState), 20)
        assert state.cell == "good-cell" and not serving.done()
        assert service.stats.bad_documents == 1 and set(service.twins) == {"good-cell"}
        logged = [r for r in caplog.records if "r-bad" in r.getMessage()]
        assert len(logged) == 1 and "no simulated cell" in logged[0].getMessage()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)


async def test_the_monitor_shows_a_label_that_looks_like_markup_as_sent_and_goes_on(broker_url, unique_lab):
    out = io.StringIO()
    watching = asyncio.create_task(
        monitor(broker_url, unique_lab, seconds=5.0, console=Console(file=out, width=200, force_terminal=False))
    )
    await asyncio.sleep(1.5)  # the monitor has subscribed (it connects in milliseconds)
    async with Bus(broker_url, f"poison-{unique_lab}") as bus:
        event = busmod.topic(unique_lab, "ch", "event")
        await bus.publish(event, _ended("r-1", "[/bold]"))
        await bus.publish(event, _start(unique_lab, "ch", "r-2", "cell-2"))
        await bus.flush()
    view = await asyncio.wait_for(watching, 20)  # it returned its view: nothing stopped it
    assert view.bad_documents == 0
    assert list(view.events) == ["ch step 0 '[/bold]' ended", "ch run r-2 started: p on cell-2"]
    assert "ch step 0 '[/bold]' ended" in out.getvalue()


def test_a_document_the_view_cannot_show_is_counted_undone_and_the_next_is_shown(caplog):
    view = MonitorView()
    view.take("t", ChannelStatus(channel="ch1", state=ChannelState.idle))
    # A status whose time is missing cannot be drawn: built without validation, as no decoded one can be.
    broken = ChannelStatus.model_construct(channel="ch2", state=ChannelState.running, time=None)
    with caplog.at_level(logging.ERROR, logger="labtwin.cli.monitor"):
        assert view.take("t", broken) is False
    assert view.bad_documents == 1 and set(view.channels) == {"ch1"}
    assert len([r for r in caplog.records if "ChannelStatus" in r.getMessage()]) == 1
    assert view.take("t", ChannelStatus(channel="ch3", state=ChannelState.running)) is True
    assert set(view.channels) == {"ch1", "ch3"}


async def test_the_recorder_skips_a_document_its_store_refuses_and_stores_the_next(
    embedded_broker, unique_lab, postgres_url
):
    store = Store.open(postgres_url)
    recorder = Recorder(embedded_broker.url, store, unique_lab, client_id=f"recorder-{unique_lab}")
    stop = asyncio.Event()
    serving = asyncio.create_task(recorder.serve(stop))
    try:
        await recorder.wait_ready()
        async with Bus(embedded_broker.url, f"poison-{unique_lab}") as bus:
            event = busmod.topic(unique_lab, "ch", "event")
            await bus.publish(event, _ended("r-bad", "rest\x00"))
            await asyncio.sleep(0.5)  # its own write, not one transaction with the next
            await bus.publish(event, _start(unique_lab, "ch", "r-ok", "cell"))
            await bus.flush()
        try:
            await _until(lambda: serving.done() or any(r.run_id == "r-ok" for r in store.runs()))
        except TimeoutError:
            pass
        assert not serving.done(), f"the recorder stopped: {serving.exception()!r}"
        assert [r.run_id for r in store.runs()] == ["r-ok"]
        assert recorder.stats.bad_documents == 1
    finally:
        stop.set()
        if not serving.done():
            await asyncio.wait_for(serving, 10)
        store.close()
