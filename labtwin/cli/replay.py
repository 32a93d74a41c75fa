"""`labtwin replay FILE`: a recording back through the bus, with the twin following it as if live."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from labtwin.analysis.summary import summarize_cycles
from labtwin.bus import Bus, topic
from labtwin.cli.wiring import twin_factory
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.data.replay import documents
from labtwin.documents import Anomaly, SampleBatch, StepEvent
from labtwin.formats import read_recording


async def run_replay(
    path: Path, broker_url: str | None, speed: float | None, model: str | None, circuit: str | None, cell: str | None
) -> tuple[dict, list[Anomaly]]:
    from labtwin.bus.broker import EmbeddedBroker
    from labtwin.twin.service import TwinService

    recording = read_recording(path)
    lab, channel = "replay", "replay"
    cell_id = cell or recording.name
    docs = list(documents(recording, lab=lab, channel=channel, cell_id=cell_id))
    broker = None
    if broker_url is None:
        broker = await EmbeddedBroker().start()
        broker_url = broker.url
    stop = asyncio.Event()
    # The replay's one channel, with the chosen model as its twin model: the same factory the live twin uses.
    config = LabConfig(lab=lab, channels={channel: ChannelConfig(driver="simulated", twin_model=model)})
    service = TwinService(
        broker_url, twin_factory(config, circuit=circuit), lab, client_id=f"twin-replay-{docs[0].run_id}"
    )
    task = asyncio.create_task(service.serve(stop))
    wall = time.perf_counter()
    try:
        await service.wait_ready()
        async with Bus(broker_url, f"replay-{docs[0].run_id}") as bus:
            start_wall, start_cell = time.perf_counter(), 0.0
            for doc in docs:
                if speed is not None and isinstance(doc, SampleBatch):
                    due = start_wall + (doc.time_s[0] - start_cell) / speed
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                kind = "data" if isinstance(doc, SampleBatch) else "event"
                await bus.publish(topic(lab, channel, kind), doc)
            await bus.flush()
        await service.wait_run_followed(docs[0].run_id, timeout_s=3600.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        if broker is not None:
            await broker.stop()
    ended = [d for d in docs if isinstance(d, StepEvent) and d.event == "ended"]
    cycles = summarize_cycles(ended)
    summary = {
        "file": str(path),
        "format": recording.source_format,
        "cell": cell_id,
        "model": model,
        "samples": len(recording),
        "steps": len(ended),
        "cycles": len(cycles),
        "impedance_spectra": sum(1 for d in ended if d.step.value == "eis"),
        "cell_time_s": float(recording.time_s[-1] - recording.time_s[0]),
        "wall_time_s": time.perf_counter() - wall,
        "cycle_table": [c.model_dump() for c in cycles],
        "nominal_capacity_Ah": _nominal(docs[0]),
        "nominal_capacity_source": getattr(docs[0], "metadata", {}).get("nominal_capacity_source"),
    }
    return summary, list(service.anomalies)


def _nominal(start) -> float | None:
    text = getattr(start, "metadata", {}).get("nominal_capacity_Ah")
    return float(text) if text else None
