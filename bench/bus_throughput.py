"""N simulated channels at max speed through the broker into the store: samples/s end to end, lost samples.

Drives the agents directly over MQTT (no Prefect: this measures the bus, the
agents and the recorder, not orchestration). Each channel runs one long
constant-current/rest sequence at 1 s sampling.

    python bench/bus_throughput.py                         # embedded broker, 4 channels
    python bench/bus_throughput.py --broker mqtt://127.0.0.1:1883 --channels 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.documents import EndConditions, Limits, StepCommand, StepKind  # noqa: E402
from tests.helpers import run_steps_by_hand, sim_lab  # noqa: E402


def charge_and_rest(hours: float) -> list[StepCommand]:
    """The bench's run on every channel: a cc charge to 3.6 V (at most ``hours``), then ``hours`` of rest, 1 s sampling."""
    return [
        StepCommand(
            run_id="",
            step_index=0,
            step=StepKind.cc,
            current_A=2.4e-4,
            end=EndConditions(voltage_V=3.6),
            limits=Limits(step_time_max_s=hours * 3600),
            sample_interval_s=1,
        ),
        StepCommand(
            run_id="", step_index=1, step=StepKind.rest, end=EndConditions(time_s=hours * 3600), sample_interval_s=1
        ),
    ]


async def main(broker: str | None, channels: int, hours: float) -> None:
    names = [f"ch{i:02d}" for i in range(channels)]
    lab = sim_lab("bench", {n: "lco_lgps_glassy" for n in names})
    db = Path(tempfile.mkdtemp()) / "bench.db"
    steps = charge_and_rest(hours)
    async with LocalLab(lab, names, broker, str(db)) as local:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                run_steps_by_hand(
                    local.url, "bench", n, f"bench-{n}", [s.model_copy(update={"run_id": f"bench-{n}"}) for s in steps]
                )
                for n in names
            )
        )
        for n in names:
            await local.wait_stored(f"bench-{n}", 120)
        wall = time.perf_counter() - t0
        produced = sum(stop.n_samples for _, stop in results)
        stored = sum(local.store.sample_count(f"bench-{n}") for n in names)
        where = "embedded amqtt" if local.broker else local.url
    print(f"broker: {where}; channels: {channels}; store: SQLite WAL")
    print(f"samples produced {produced}, stored {stored}, lost {produced - stored}")
    print(f"wall {wall:.2f} s; end-to-end {stored / wall:,.0f} samples/s")
    if produced != stored:
        sys.exit(1)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default=None, help="mqtt://host:port; default: embedded broker")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--hours", type=float, default=4.0, help="cell hours per step")
    a = p.parse_args()
    asyncio.run(main(a.broker, a.channels, a.hours))
