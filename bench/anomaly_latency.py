"""Anomaly latency in real-time mode: from the sample that shows a soft short to the anomaly message.

Real stack in one process: a broker (embedded, or --broker URL such as the
Mosquitto at mqtt://127.0.0.1:1883), N simulated channels running at real
time (speed 1) with 0.2 s sampling, the twin service, and a subscriber on
labtwin/v1/<lab>/cells/+/anomaly. Each cell is charging at 0.2C while an
intermittent soft short (a filament that forms and burns out) appears for
2 s every 5 s: each appearance pulls the voltage down between two samples,
which the twin's jump detector flags on the first sample after.

Latency = wall time the anomaly message reaches the subscriber minus wall
time at which the agent read the sample that completed the evidence (the
simulated instrument's read() is wrapped to log cell clock -> wall clock;
the anomaly's detected_time_s is run time = cell clock - the run's start).
Target (issue 4): p99 under 200 ms.

    python bench/anomaly_latency.py [--channels 8] [--seconds 90] [--broker mqtt://127.0.0.1:1883]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin import bus as busmod  # noqa: E402
from labtwin.bus import Bus  # noqa: E402
from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.config.lab import ChannelConfig, LabConfig  # noqa: E402
from labtwin.documents import Limits, RunStart  # noqa: E402
from labtwin.physics.cell import Fault  # noqa: E402

PROTOCOL = """
metadata: {{name: latency bench, chemistry: LCO|LGPS|Li-In}}
record: {{interval_s: 0.2}}
safety: {{voltage_min_V: 1.8, voltage_max_V: 3.75}}
method:
  - rest: {{duration_s: 20}}
  - cc: {{c_rate: 0.2, until: {{time_s: {seconds}}}}}
"""


async def main(channels: int, seconds: float, broker: str | None) -> None:
    from labtwin.orchestration.flows import run_protocol, start_prefect_api

    await start_prefect_api()
    lab = f"latency{int(time.time()) % 100000}"
    names = [f"ch{k}" for k in range(channels)]
    config = LabConfig(
        lab=lab,
        channels={
            n: ChannelConfig(
                driver="simulated",
                cell="lco-lgps-glassy-ceramic",
                speed=1.0,
                seed=k,
                limits=Limits(voltage_min_V=1.7, voltage_max_V=3.8),
            )
            for k, n in enumerate(names)
        },
    )
    workdir = Path(tempfile.mkdtemp())
    protocol = workdir / "latency.yaml"
    protocol.write_text(PROTOCOL.format(seconds=seconds))
    latencies: list[float] = []
    run_start: dict[str, float] = {}
    async with LocalLab(config, names, broker, str(workdir / "bench.db"), twin=True) as local:
        reads: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for k, name in enumerate(names):
            agent = local.agents[name]
            original_read = agent.driver.read

            def logged_read(original=original_read, clock=agent.clock, log=reads[name]):
                reading = original()
                log.append((clock.now(), time.time()))
                return reading

            agent.driver.read = logged_read
            model = agent.driver.model
            for pulse in range(int(seconds // 5)):
                # the charge starts after the 20 s rest; cell age counts from the model's creation (~now)
                model.inject(
                    Fault(
                        kind="soft_short",
                        at_time_s=model.age_s + 30.0 + 5.0 * pulse + 0.37 * k,
                        duration_s=2.0,
                        resistance_ohm=20_000.0,
                    )
                )
        async with Bus(local.url, f"latency-listener-{lab}") as bus:
            sub = await bus.subscribe([f"{busmod.ROOT}/{lab}/cells/+/anomaly", f"{busmod.ROOT}/{lab}/+/event"])

            async def listen() -> None:
                async for message in sub:
                    doc = message.document
                    if isinstance(doc, RunStart):
                        run_start[doc.run_id] = local.agents[doc.channel].run.start_cell_s
                    elif getattr(doc, "kind", "") == "voltage_drop":
                        received = time.time()
                        start = run_start.get(doc.run_id)
                        if start is not None and doc.detected_time_s is not None:
                            log = np.array(reads[doc.channel])
                            k = int(np.argmin(np.abs(log[:, 0] - (start + doc.detected_time_s))))
                            latencies.append(received - log[k, 1])

            listener = asyncio.create_task(listen())
            wall = time.perf_counter()
            await asyncio.gather(*(run_protocol(str(protocol), n, local.url, lab=lab) for n in names))
            await asyncio.sleep(1.0)
            listener.cancel()
    lat = np.array(latencies) * 1e3
    print(
        f"{channels} channels at real time, 0.2 s sampling, {seconds:.0f} s of charge each; wall {time.perf_counter() - wall:.0f} s"
    )
    if len(lat) == 0:
        print("no anomalies received: the bench did not work")
        return
    print(
        f"anomalies: {len(lat)}; latency sample -> anomaly message: median {np.median(lat):.0f} ms, "
        f"p90 {np.percentile(lat, 90):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, max {lat.max():.0f} ms (target p99 < 200 ms)"
    )
    service = local.twin_service
    if service is not None and service.stats.latencies_s:
        inner = np.array(service.stats.latencies_s) * 1e3
        print(
            f"inside the twin service (batch received -> anomaly published): median {np.median(inner):.1f} ms, p99 {np.percentile(inner, 99):.1f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--broker", default=None)
    args = parser.parse_args()
    asyncio.run(main(args.channels, args.seconds, args.broker))
