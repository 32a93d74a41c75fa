"""A campaign of N simulated cells (64 by default), each a 10-cycle formation, at max speed on this machine:
wall time, steps per second, and what Prefect adds per step.

The same compiled steps run twice on the same in-process lab (embedded broker, one agent per channel,
the recorder writing SQLite): once driven straight over MQTT (publish a step, wait for its end: no
Prefect), once as `labtwin campaign run` does it (the `campaign` flow, a `run_protocol` flow per cell, a
Prefect task run per step, the ephemeral Prefect API). The difference is Prefect's cost:

  per step on a channel's critical path  = (wall_prefect - wall_direct) / steps per cell
  per step of the campaign (all channels) = (wall_prefect - wall_direct) / all steps

    python bench/campaign.py                 # 64 cells
    python bench/campaign.py --cells 16 --cycles 5
    python bench/campaign.py --prefect-db memory     # the ephemeral API's database in memory
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import yaml  # noqa: E402

from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.documents import Limits  # noqa: E402
from labtwin.orchestration.campaign_flow import run_campaign  # noqa: E402
from labtwin.orchestration.flows import start_prefect_api  # noqa: E402
from labtwin.protocols.compile import CompileContext, compile_protocol  # noqa: E402
from labtwin.protocols.model import load_protocol  # noqa: E402
from tests.helpers import run_steps_by_hand, sim_lab  # noqa: E402

CELL = "lco_lgps_glassy"  # LCO | glassy LGPS | Li-In, 1.2 mAh, 1.9-3.7 V


def formation(cycles: int) -> str:
    return yaml.safe_dump(
        {
            "metadata": {"name": f"bench formation {cycles} cycles", "nominal_capacity_Ah": 1.2e-3},
            "record": {"interval_s": 30},
            "safety": {"voltage_min_V": 1.9, "voltage_max_V": 3.7},
            "method": [
                {"rest": {"duration_s": 600}},
                {
                    "repeat": cycles,
                    "steps": [
                        "Charge at C/2 until 3.6 V",
                        "Rest for 10 minutes",
                        "Discharge at C/2 until 2.0 V",
                        "Rest for 10 minutes",
                    ],
                },
            ],
        },
        sort_keys=False,
    )


async def main(cells: int, cycles: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="labtwin-bench-campaign-"))
    protocol = work / "formation.yaml"
    protocol.write_text(formation(cycles))
    names = [f"ch{i:02d}" for i in range(cells)]
    lab = sim_lab("benchcampaign", {n: CELL for n in names}, Limits(voltage_min_V=1.8, voltage_max_V=3.8))
    campaign = work / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "campaign": "bench",
                "cells": [
                    {"id": f"cell{i:02d}", "channels": [n], "protocols": [str(protocol)], "nominal_capacity_Ah": 1.2e-3}
                    for i, n in enumerate(names)
                ],
            }
        )
    )
    store = str(work / "bench.db")
    await start_prefect_api()
    proto = load_protocol(protocol)
    async with LocalLab(lab, names, None, store) as local:
        # Direct: the same steps over MQTT without Prefect.
        t0 = time.perf_counter()
        direct = await asyncio.gather(
            *(
                run_steps_by_hand(
                    local.url,
                    lab.lab,
                    n,
                    f"direct-{n}",
                    compile_protocol(proto, CompileContext(f"direct-{n}", 1.2e-3, lab.channel(n).limits)),
                )
                for n in names
            )
        )
        for n in names:
            await local.wait_stored(f"direct-{n}", 300)
        wall_direct = time.perf_counter() - t0
        steps_per_cell = len(direct[0][0])
        samples_direct = sum(stop.n_samples for _, stop in direct)
        # Prefect: the campaign flow, as `labtwin campaign run` runs it.
        t0 = time.perf_counter()
        results = await run_campaign(str(campaign), local.url, lab.lab, store)
        for r in results:
            if r.outcome == "success":
                await local.wait_stored(r.run_id, 300)
        wall_prefect = time.perf_counter() - t0
        samples_prefect = sum(local.store.sample_count(r.run_id) for r in results)
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    steps = steps_per_cell * cells
    print(
        f"{cells} cells x {cycles}-cycle formation ({steps_per_cell} steps each, {steps} steps, "
        f"cell {CELL}, 30 s sampling), max speed, {os.cpu_count()} cores"
    )
    print(
        f"  direct over MQTT : wall {wall_direct:7.1f} s, {steps / wall_direct:6.1f} steps/s, "
        f"{samples_direct / wall_direct:8,.0f} samples/s stored"
    )
    print(
        f"  Prefect campaign : wall {wall_prefect:7.1f} s, {steps / wall_prefect:6.1f} steps/s, "
        f"{samples_prefect / wall_prefect:8,.0f} samples/s stored"
    )
    print(f"  outcomes: {outcomes}")
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url
    shown = url.get_secret_value() if url is not None and hasattr(url, "get_secret_value") else url
    print(f"  Prefect database: {str(shown).split('@')[-1] if shown else 'SQLite (default)'}")
    added = wall_prefect - wall_direct
    print(
        f"  Prefect adds {added:.1f} s ({wall_prefect / wall_direct:.2f}x): {added / steps_per_cell * 1e3:.0f} ms per step "
        f"on each channel's critical path, {added / steps * 1e3:.1f} ms per step of the campaign"
    )
    await prefect_alone(cells, steps_per_cell)


async def prefect_alone(flows: int, tasks: int) -> None:
    """Prefect's own floor in the same run: as many flow runs and task runs as the campaign, each task empty.

    Its CPU per task (this process: the task engine; the API's process: the server) is what no change to
    labtwin's steps can take away while every step stays one Prefect task run."""
    import psutil
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from labtwin.orchestration import prefect_api

    @task(cache_policy=NO_CACHE)
    async def empty_step(i: int) -> int:
        return i

    @flow
    async def empty_cell(k: int) -> None:
        for i in range(tasks):
            await empty_step(i)

    me = psutil.Process()
    server = None
    if prefect_api._api is not None and prefect_api._api.process is not None:
        root = psutil.Process(prefect_api._api.process.pid)
        server = [root, *root.children(recursive=True)]

    def cpu(procs: list) -> float:
        return sum(t.user + t.system for t in (p.cpu_times() for p in procs))

    client0, server0 = cpu([me]), cpu(server) if server else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(empty_cell(k) for k in range(flows)))
    wall = time.perf_counter() - t0
    n = flows * tasks
    client = (cpu([me]) - client0) / n * 1e3
    served = f", server CPU {(cpu(server) - server0) / n * 1e3:.1f} ms" if server else ""
    print(
        f"  Prefect alone ({flows} flows x {tasks} empty tasks): wall {wall:.1f} s, {wall / n * 1e3:.1f} ms per task; "
        f"per task: client CPU {client:.1f} ms{served}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=64)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument(
        "--prefect-db",
        default=None,
        help="the ephemeral API's database: memory, postgresql://..., sqlite:///path (default: SQLite)",
    )
    args = parser.parse_args()
    from labtwin.orchestration.prefect_server import ephemeral_database

    with ephemeral_database(args.prefect_db):
        asyncio.run(main(args.cells, args.cycles))
