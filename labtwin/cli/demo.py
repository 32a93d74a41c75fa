"""`labtwin demo`: the mission on the embedded defaults, end to end, in one process.

Embedded broker -> one agent per simulated channel + the recorder -> a
formation protocol per cell as concurrent Prefect flows (ephemeral local API)
-> summary per cell, samples in SQLite, V-t and V-Q plots. The progress bars
(labtwin.cli.progress, shared with dryrun, run and campaign run) are fed by the
bus, like any other subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from rich.console import Console

from labtwin.analysis.plots import plot_run
from labtwin.cli.progress import Mode, follow_progress, progress_mode
from labtwin.cli.wiring import LocalLab, default_lab
from labtwin.data.store import describe_url
from labtwin.security import BrokerConnection, as_identity
from labtwin.security.redact import redact_url

log = logging.getLogger(__name__)

# ch1: bare LTO thin film at 0.1C (seed 000): its plateau oscillates and the twin flags the onset.
# ch2: glassy/ceramic-coated LCO (seed 003), a healthy cell: the twin follows it and stays quiet.
DEMO_PLAN = {"ch1": "demo-lto-0.1C", "ch2": "lco_formation"}


async def run_demo(
    broker_url: str | BrokerConnection | None,
    store_url: str,
    out: Path,
    console: Console,
    quiet: bool = False,
    security: Path | None = None,
    progress: Mode | None = None,
    dashboard_port: int | None = 8050,
    stay: bool = False,
) -> dict:
    """``progress``: how the runs' progress shows on stderr (labtwin.cli.progress); by default on a
    terminal unless ``quiet``."""
    from labtwin.orchestration.flows import begin_prefect_api, run_protocol, start_prefect_api  # imports Prefect (~1 s)

    wall_start = time.monotonic()
    config = default_lab()
    begin_prefect_api()  # imports and starts in its own process while the broker, agents and twin come up
    progress_console = Console(stderr=True)
    mode = progress if progress is not None else progress_mode(None, quiet, progress_console)
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
        board = await _start_dashboard(local.url, store.url, dashboard_port) if dashboard_port is not None else None
        if board is not None and not quiet:
            console.print(f"[bold]dashboard[/]: {board.url}  (open it to watch both cells live)")
        try:
            await start_prefect_api()
            viewer = as_identity(local.url, "viewer")  # the demo's progress reads the bus as a dashboard would
            async with follow_progress(viewer, config.lab, mode, progress_console, list(DEMO_PLAN)):
                summaries = await asyncio.gather(
                    *(run_protocol(proto, ch, local.url, lab=config.lab) for ch, proto in DEMO_PLAN.items())
                )
            for s in summaries:
                await local.wait_stored(s.run_id)
                await twin_service.wait_run_followed(s.run_id, timeout_s=600.0)
            anomalies = list(twin_service.anomalies)
            states = {cell: twin.state for cell, twin in twin_service.twins.items()}
            plots = {}
            for s in summaries:
                samples = store.samples(s.run_id)
                plots[s.channel] = str(plot_run(samples, f"{s.cell_id} ({s.protocol})", out / f"{s.run_id}.png"))
            stored = {s.run_id: store.sample_count(s.run_id) for s in summaries}
            db = store.url
            if board is not None and stay and not quiet:
                _print_results(console, summaries, stored, plots, states, anomalies, db, wall_start)
                console.print(f"the dashboard stays up at {board.url} with the demo's runs: Ctrl-C to end")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
                return _result(summaries, stored, plots, db, anomalies, states, wall_start, board.url)
        finally:  # the dashboard ends with the demo, however the demo ends
            if board is not None:
                await board.stop()
    if not quiet:
        _print_results(console, summaries, stored, plots, states, anomalies, db, wall_start)
    return _result(summaries, stored, plots, db, anomalies, states, wall_start, board.url if board else None)


async def _start_dashboard(url: BrokerConnection, store_url: str, port: int):
    """The dashboard on the demo's broker and store; on any free port when ``port`` is taken."""
    from labtwin.dashboard.app import DashboardConfig
    from labtwin.dashboard.server import DashboardServer

    for candidate in (port, 0):
        try:
            server = DashboardServer(DashboardConfig(broker=url, store_url=store_url, port=candidate))
        except OSError:
            continue
        await server.start()
        return server
    return None


def _print_results(console, summaries, stored, plots, states, anomalies, db, wall_start) -> None:
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


def _result(summaries, stored, plots, db, anomalies, states, wall_start, dashboard_url) -> dict:
    return {
        "dashboard_url": dashboard_url,
        "summaries": [s.model_dump() for s in summaries],
        "stored_samples": stored,
        "plots": plots,
        "store": describe_url(db),
        "anomalies": [a.model_dump(mode="json") for a in anomalies],
        "twin_states": {cell: state.model_dump(mode="json") for cell, state in states.items()},
        "wall_time_s": time.monotonic() - wall_start,
    }
