"""Soak: N simulated channels for days of cell time at 1 s sampling, through Mosquitto into SQLite or PostgreSQL.

What a lab needs to know before it leaves 16 channels running for a week: does the end-to-end rate hold, does
memory stay flat, how big do the agents' spools get, and is anything lost. Each channel rests for the given
cell time at max speed (one sample per cell second), so a week is 604 800 samples per channel. Figures are
printed beside their references from the same run: the rate of the last tenth of the run beside the first
tenth's, the process's memory at the end beside its memory once every channel was running.

    python bench/soak.py                                   # 16 channels, 1 day, Mosquitto at 127.0.0.1:1883, SQLite
    python bench/soak.py --days 7 --store postgresql://postgres@127.0.0.1:5432/postgres
    python bench/soak.py --broker mqtt://127.0.0.1:1883 --channels 8 --days 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.data.store import Store  # noqa: E402
from labtwin.documents import EndConditions, Limits, StepCommand, StepKind  # noqa: E402
from tests.helpers import run_steps_by_hand, sim_lab  # noqa: E402


def _postgres_schema(base: str) -> tuple[str, str]:
    import psycopg

    schema = f"labtwin_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", schema


def _drop_schema(base: str, schema: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


def first_and_last_tenth(rates: list[tuple[float, int]], drop_last: bool = False) -> str | None:
    """The stored rate over the last tenth of (wall time, samples stored) readings beside the first tenth's;
    ``drop_last``: leave out the final reading (taken while the store drained, not at the run's pace)."""
    if len(rates) < 4:
        return None
    k = max(1, len(rates) // 10)

    def rate(window: list[tuple[float, int]]) -> float:
        return (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-9)

    first = rate(rates[: k + 1])
    last = rate(rates[-k - 2 : -1] if drop_last else rates[-k - 1 :])
    ratio = f"{last / first:.2f}x" if first > 0 else "first tenth idle"
    return f"stored rate, last tenth {last:,.0f} samples/s beside first tenth {first:,.0f} samples/s ({ratio})"


def _spool_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.db*") if p.is_file())


async def main(broker: str, channels: int, days: float, store: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="labtwin-soak-"))
    os.chdir(work)  # the agents' spools go to ./labtwin-data/spool
    schema = None
    if store and store.startswith("postgresql"):
        store_url, schema = _postgres_schema(store)
    else:
        store_url = str(work / "soak.db")
    names = [f"s{i:02d}" for i in range(channels)]
    lab_name = f"soak{os.getpid()}"
    lab = sim_lab(lab_name, {n: "lco_lgps_glassy" for n in names}, Limits(voltage_min_V=1.5, voltage_max_V=4.0))
    cell_s = days * 86400
    me = psutil.Process()
    rss: list[tuple[float, int]] = []
    rates: list[tuple[float, int]] = []
    spool_max = 0
    try:
        async with LocalLab(lab, names, broker, store_url) as local:
            assert local.store is not None

            def count_stored() -> int:
                # Its own read-only connection, in a thread: a count over millions of rows must not stall the
                # event loop the agents and the recorder share here (it did: every client missed its keepalive).
                reader = Store.open(store_url, read_only=True)
                try:
                    return sum(reader.sample_count(f"soak-{n}") for n in names)
                finally:
                    reader.close()

            async def watch() -> None:
                nonlocal spool_max
                while True:
                    await asyncio.sleep(10.0)
                    stored = await asyncio.to_thread(count_stored)
                    rates.append((time.perf_counter(), stored))
                    rss.append((time.perf_counter(), me.memory_info().rss))
                    spool_max = max(spool_max, _spool_bytes(work / "labtwin-data"))

            watcher = asyncio.create_task(watch())
            t0 = time.perf_counter()
            step = StepCommand(
                run_id="", step_index=0, step=StepKind.rest, end=EndConditions(time_s=cell_s), sample_interval_s=1
            )
            results = await asyncio.gather(
                *(
                    run_steps_by_hand(
                        local.url,
                        lab_name,
                        n,
                        f"soak-{n}",
                        [step.model_copy(update={"run_id": f"soak-{n}"})],
                        step_timeout_s=24 * 3600,
                    )
                    for n in names
                )
            )
            for n in names:
                await local.wait_stored(f"soak-{n}", 600)
            wall = time.perf_counter() - t0
            watcher.cancel()
            produced = sum(stop.n_samples for _, stop in results)
            stored = sum(local.store.sample_count(f"soak-{n}") for n in names)
            recorder = local.recorder
            resends = recorder.stats.resend_requests if recorder else 0
            shed = recorder.stats.shed if recorder else 0
    finally:
        if schema is not None and store:
            _drop_schema(store, schema)
    print(f"soak: {channels} channels x {days:g} days of cell time at 1 s; broker {broker}; store {store or 'SQLite'}")
    print(
        f"samples produced {produced:,}, stored {stored:,}, lost {produced - stored}; resend requests {resends}, batches shed {shed}"
    )
    print(f"wall {wall:.1f} s; end to end {stored / wall:,.0f} samples/s")
    tenths = first_and_last_tenth(rates)
    if tenths is not None:
        print(tenths)
    if len(rss) >= 2:
        start, end = rss[0][1], rss[-1][1]
        peak = max(r for _, r in rss)
        print(
            f"memory (agents + recorder, one process): end {end / 2**20:.0f} MiB beside {start / 2**20:.0f} MiB at "
            f"10 s in ({end / start:.2f}x); peak {peak / 2**20:.0f} MiB"
        )
    print(f"largest spool total on disk during the run: {spool_max / 2**20:.1f} MiB")
    return 0 if produced == stored else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--days", type=float, default=1.0, help="cell days per channel (a week: 7)")
    p.add_argument(
        "--store", default=None, help="a postgresql:// URL (a schema of its own, dropped after); default SQLite"
    )
    a = p.parse_args()
    sys.exit(asyncio.run(main(a.broker, a.channels, a.days, a.store)))
