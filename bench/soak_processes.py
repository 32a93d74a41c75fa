"""Soak as a lab runs it: every agent and the recorder a process of its own, through a Mosquitto, for days.

bench/soak.py puts 16 agents and the recorder on one event loop, which measures that loop (it collapses past
a day of cell time at max speed: every client starves). A lab runs `labtwin agent` per channel and
`labtwin record`, each its own process, often on its own PC. This runs exactly those commands: a Mosquitto
started for the soak (max_queued_messages 100000), or --broker; N `labtwin agent --channel sNN --speed X`
processes; one `labtwin record`; the bench drives each channel's one long rest step at 1 s sampling and
counts the store. Paced (default 1000 cell seconds per wall second: a week of cell time in ~10 min), as a
real lab is, so the figures are steady-state ones. Printed, each beside its reference from the same run:
the stored rate over the last tenth beside the first tenth's, each process's memory at the end beside its
memory once every channel ran, the largest spool, and samples produced against stored (0 lost is the test).

    python bench/soak_processes.py                       # 16 channels, 7 days, speed 1000, SQLite
    python bench/soak_processes.py --store postgresql://postgres@127.0.0.1:5432/postgres
    python bench/soak_processes.py --channels 4 --days 0.5 --speed 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.data.store import Store  # noqa: E402
from labtwin.documents import EndConditions, StepCommand, StepKind  # noqa: E402
from tests.helpers import run_steps_by_hand  # noqa: E402
from tests.lab_processes import LABTWIN, Service  # noqa: E402
from tests.mosquitto_proc import MosquittoProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import _drop_schema, _postgres_schema, _spool_bytes, first_and_last_tenth  # noqa: E402


def _rss(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        p = psutil.Process(pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.NoSuchProcess:
        return 0


async def _wait_agents_ready(
    broker: str, lab: str, names: list[str], services: list[Service], timeout_s: float
) -> None:
    """Every agent has published its retained status: a StartRun sent before it subscribed would be lost."""
    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import ChannelStatus

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    async with Bus(broker) as bus:
        sub = await bus.subscribe(f"{busmod.ROOT}/{lab}/+/status")
        while seen != set(names):
            for s in services:
                if s.proc is None or s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} ended at start: {s.logs()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"agents not ready after {timeout_s:.0f} s: {sorted(set(names) - seen)}")
            try:
                doc = (await sub.get(1.0)).document
            except TimeoutError:
                continue
            if isinstance(doc, ChannelStatus) and doc.state.value != "offline":
                seen.add(doc.channel)


async def main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="labtwin-soakp-"))
    mosquitto = None
    if args.broker:
        broker = args.broker
    else:
        mosquitto = MosquittoProcess(work / "mosquitto").start()
        broker = mosquitto.url
    schema = None
    if args.store and args.store.startswith("postgresql"):
        store_url, schema = _postgres_schema(args.store)
    else:
        store_url = str(work / "soak.db")
    names = [f"s{i:02d}" for i in range(args.channels)]
    lab_name = f"soakp{os.getpid()}"
    lab_file = work / "lab.yaml"
    lab_file.write_text(
        yaml.safe_dump(
            {
                "lab": lab_name,
                "channels": {
                    n: {
                        "driver": "simulated",
                        "cell": "lco_lgps_glassy",
                        "cell_id": f"{n}-cell",
                        "limits": {"voltage_min_V": 1.5, "voltage_max_V": 4.0},
                    }
                    for n in names
                },
            }
        )
    )
    env = {**os.environ, "LABTWIN_BROKER": broker, "LABTWIN_LAB": str(lab_file)}
    services: list[Service] = []
    recorder = Service("recorder", [LABTWIN, "record", "--store", store_url], work, env).start()
    services.append(recorder)
    agents = [Service(n, [LABTWIN, "agent", "--channel", n, "--speed", str(args.speed)], work, env) for n in names]
    for a in agents:
        services.append(a.start())
    cell_s = args.days * 86400
    rates: list[tuple[float, int]] = []
    memory: list[dict[str, int]] = []
    spool_max = 0

    def count_stored(exact: bool = False) -> int:
        """Samples in the store: the final figure counts the samples table; the progress figure sums the batches'
        counts (a hundredth of the rows: a COUNT over millions of PostgreSQL rows every 10 s competed with the
        recorder's inserts and lowered the rate it measured)."""
        try:
            reader = Store.open(store_url, read_only=True)
        except Exception:
            return 0
        try:
            if exact:
                return sum(reader.sample_count(f"soak-{n}") for n in names)
            from sqlalchemy import func, select

            from labtwin.data.schema import batches

            query = select(func.coalesce(func.sum(batches.c.n), 0)).where(batches.c.run_id.like("soak-%"))
            with reader.engine.connect() as conn:
                return int(conn.execute(query).scalar_one())
        finally:
            reader.close()

    async def watch() -> None:
        nonlocal spool_max
        while True:
            await asyncio.sleep(10.0)
            rates.append((time.perf_counter(), await asyncio.to_thread(count_stored)))
            memory.append(
                {
                    "recorder": _rss(recorder.proc.pid if recorder.proc else None),
                    "agents": sum(_rss(a.proc.pid if a.proc else None) for a in agents),
                    "mosquitto": _rss(mosquitto.pid) if mosquitto else 0,
                }
            )
            spool_max = max(spool_max, _spool_bytes(work / "labtwin-data"))

    try:
        await _wait_agents_ready(broker, lab_name, names, services, 180.0)
        await asyncio.sleep(2.0)  # the recorder subscribes
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        step = StepCommand(
            run_id="", step_index=0, step=StepKind.rest, end=EndConditions(time_s=cell_s), sample_interval_s=1
        )
        results = await asyncio.gather(
            *(
                run_steps_by_hand(
                    broker,
                    lab_name,
                    n,
                    f"soak-{n}",
                    [step.model_copy(update={"run_id": f"soak-{n}"})],
                    step_timeout_s=cell_s / args.speed * 3 + 600,
                )
                for n in names
            )
        )
        produced = sum(stop.n_samples for _, stop in results)
        deadline = time.monotonic() + 600
        stored = 0
        while time.monotonic() < deadline:
            stored = await asyncio.to_thread(count_stored, True)
            if stored >= produced:
                break
            await asyncio.sleep(2.0)
        wall = time.perf_counter() - t0
        watcher.cancel()
    finally:
        for s in services:
            s.stop()
        if mosquitto is not None:
            mosquitto.stop()
        if schema is not None and args.store:
            _drop_schema(args.store, schema)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"soak (processes): {args.channels} `labtwin agent` + `labtwin record` x {args.days:g} days of cell time at 1 s "
        f"sampling, speed {args.speed:g}; broker {'own Mosquitto' if mosquitto else broker}; store "
        f"{'PostgreSQL' if schema else 'SQLite'}"
    )
    print(f"samples produced {produced:,}, stored {stored:,}, lost {produced - stored}")
    print(
        f"wall {wall:.0f} s; stored {stored / wall:,.0f} samples/s (paced: {args.channels * args.speed:,.0f}/s offered)"
    )
    tenths = first_and_last_tenth(rates, drop_last=True)
    if tenths is not None:
        print(tenths)
    if len(memory) >= 2:
        a, b = memory[0], memory[-1]
        for who in ("recorder", "agents", "mosquitto"):
            if a[who]:
                peak = max(m[who] for m in memory)
                print(
                    f"memory {who}: end {b[who] / 2**20:.0f} MiB beside {a[who] / 2**20:.0f} MiB at 10 s "
                    f"({b[who] / a[who]:.2f}x), peak {peak / 2**20:.0f} MiB"
                )
    print(f"largest spool total on disk: {spool_max / 2**20:.1f} MiB")
    return 0 if produced == stored else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=None, help="default: a Mosquitto started for the soak")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--speed", type=float, default=1000.0)
    p.add_argument("--store", default=None, help="default: SQLite in the soak's folder")
    p.add_argument("--keep", action="store_true", help="keep the soak's folder (logs, store, spools)")
    sys.exit(asyncio.run(main(p.parse_args())))
