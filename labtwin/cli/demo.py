"""`labtwin demo`: the mission on the embedded defaults, end to end, in one process.

Embedded broker -> one agent per simulated channel + the recorder -> a
formation protocol per cell as concurrent Prefect flows (ephemeral local API)
-> summary per cell, samples in SQLite, V-t and V-Q plots. The progress bars
are fed by the bus, like any other subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from labtwin import bus as busmod
from labtwin.analysis.plots import plot_run
from labtwin.bus import Bus
from labtwin.cli.wiring import LocalLab, default_lab
from labtwin.data.store import describe_url
from labtwin.documents import RunStart, StepEvent
from labtwin.security import BrokerConnection, as_identity
from labtwin.security.redact import redact_url

log = logging.getLogger(__name__)

# ch1: bare LTO thin film at 0.1C (seed 000): its plateau oscillates and the twin flags the onset.
# ch2: glassy/ceramic-coated LCO (seed 003), a healthy cell: the twin follows it and stays quiet.
DEMO_PLAN = {"ch1": "demo-lto-0.1C", "ch2": "lco_formation"}


async def _follow(
    url: BrokerConnection, lab: str, progress: Progress, bars: dict[str, TaskID], stop: asyncio.Event
) -> None:
    async with Bus(as_identity(url, "viewer"), f"demo-progress-{lab}") as bus:
        sub = await bus.subscribe(f"{busmod.ROOT}/{lab}/+/event")
        while not stop.is_set():
            try:
                doc = (await sub.get(0.2)).document
            except TimeoutError:
                continue
            try:
                _advance(progress, bars, doc)
            except Exception as exc:  # a progress bar is not worth the demo: skip what it cannot show
                log.error("demo progress: %s skipped: %s: %s", type(doc).__name__, type(exc).__name__, exc)


def _advance(progress: Progress, bars: dict[str, TaskID], doc) -> None:
    bar = bars.get(getattr(doc, "channel", ""))
    if bar is None:
        return
    if isinstance(doc, RunStart):
        progress.update(bar, total=doc.n_steps, description=f"{doc.channel} {doc.protocol}")
    elif isinstance(doc, StepEvent) and doc.event == "ended":
        progress.update(bar, advance=1, description=f"{doc.channel} cycle {doc.cycle}: {doc.label}")


async def run_demo(
    broker_url: str | BrokerConnection | None,
    store_url: str,
    out: Path,
    console: Console,
    quiet: bool = False,
    security: Path | None = None,
) -> dict:
    from labtwin.orchestration.flows import run_protocol, start_prefect_api  # imports Prefect (~1 s)

    wall_start = time.monotonic()
    config = default_lab()
    if not quiet:
        console.print("starting Prefect's local API (first run on a machine: ~15 s) ...")
    await start_prefect_api()
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", style="bold"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )
    async with LocalLab(config, list(DEMO_PLAN), broker_url, store_url, twin=True, security=security) as local:
        store, twin_service = local.store, local.twin_service
        assert store is not None and twin_service is not None  # record=True, twin=True
        if not quiet:
            where = "broker" if local.broker is None else "embedded broker"
            note = "" if local.broker is None else f" ({local.broker.protection})"
            console.print(
                f"[bold]labtwin demo[/]: {where} at {redact_url(local.url)}{note}, lab '{config.lab}', "
                f"store {describe_url(store.url)}"
            )
        stop = asyncio.Event()
        with progress:
            bars = {ch: progress.add_task(f"{ch} {proto}", total=None) for ch, proto in DEMO_PLAN.items()}
            follower = asyncio.create_task(_follow(local.url, config.lab, progress, bars, stop))
            summaries = await asyncio.gather(
                *(run_protocol(proto, ch, local.url, lab=config.lab) for ch, proto in DEMO_PLAN.items())
            )
            for s in summaries:
                await local.wait_stored(s.run_id)
                await twin_service.wait_run_followed(s.run_id, timeout_s=600.0)
            stop.set()
            await follower
        anomalies = list(twin_service.anomalies)
        states = {cell: twin.state for cell, twin in twin_service.twins.items()}
        plots = {}
        for s in summaries:
            samples = store.samples(s.run_id)
            plots[s.channel] = str(plot_run(samples, f"{s.cell_id} ({s.protocol})", out / f"{s.run_id}.png"))
        stored = {s.run_id: store.sample_count(s.run_id) for s in summaries}
        db = store.url
    if not quiet:
        from labtwin.cli import _summary_table

        for s in summaries:
            console.print(_summary_table(s))
            console.print(f"  samples stored: {stored[s.run_id]} of {s.n_samples} produced · plot: {plots[s.channel]}")
        from labtwin.cli import _anomaly_table

        for cell, state in states.items():
            parts = [f"twin of [bold]{cell}[/] ({state.model}): cycle {state.cycle}"]
            if state.capacity_Ah is not None:
                parts.append(f"capacity {state.capacity_Ah * 1e3:.4g} mAh")
            if state.coulombic_efficiency is not None:
                parts.append(f"CE {state.coulombic_efficiency:.2%}")
            if state.series_resistance_ohm is not None:
                parts.append(f"R0 {state.series_resistance_ohm:.3g} ohm (RLS)")
            if state.residual_sigma_V is not None:
                parts.append(f"residual sigma {state.residual_sigma_V * 1e3:.1f} mV")
            console.print(" · ".join(parts))
        console.print(_anomaly_table(anomalies) if anomalies else "the twin flagged nothing")
        console.print(f"store: {describe_url(db)} · total wall time {time.monotonic() - wall_start:.1f} s")
        console.print(
            "next: `labtwin runs`, `labtwin export RUN --format bdf`, `labtwin replay DIR_OR_FILE`, `labtwin dryrun seed003-cycling-eis --sim lco-lgps-ceramic`"
        )
    return {
        "summaries": [s.model_dump() for s in summaries],
        "stored_samples": stored,
        "plots": plots,
        "store": describe_url(db),
        "anomalies": [a.model_dump(mode="json") for a in anomalies],
        "twin_states": {cell: state.model_dump(mode="json") for cell, state in states.items()},
        "wall_time_s": time.monotonic() - wall_start,
    }
