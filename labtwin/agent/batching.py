"""Recorded readings into SampleBatch documents, flushed by size or by wall time.

A batch goes out every ``batch_size`` recorded samples, or sooner when samples come slowly: after at
most ``max_wall_s`` (0.1 s) of wall time, so a live view stays live and the twin sees a real-time
sample within its 200 ms anomaly budget. Sequence numbers run per run without gaps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labtwin.agent.lease import RunContext
from labtwin.devices.potentiostat import Reading
from labtwin.documents import SampleBatch, StepStats

#: How a paced channel waits (labtwin.twin.pacing.FollowProgress.wait): (run id, cell time it may not pass
#: unfollowed, what interrupts the wait) -> whether the follower got there.
Pacer = Callable[[str, float, Callable[[], bool]], bool]
#: Samples per batch on a paced channel: it runs at most one batch ahead of its twin (two, counting the one
#: in flight).
PACED_BATCH_SIZE = 5

COLUMNS = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")
IMPEDANCE_COLUMNS = ("frequency_Hz", "z_real_ohm", "z_imag_ohm")


def _empty_columns() -> dict[str, list[Any]]:
    return {k: [] for k in COLUMNS + IMPEDANCE_COLUMNS}


@dataclass
class BatchBuilder:
    """The columns of the batch being filled; ``take`` turns them into a SampleBatch and starts afresh."""

    run_id: str
    channel: str
    columns: dict[str, list[Any]] = field(default_factory=_empty_columns)
    impedance: bool = False

    def add(
        self,
        time_s: float,
        voltage_V: float,
        current_A: float,
        capacity_Ah: float,
        temperature_C: float,
        step: int,
        cycle: int,
        reading: Reading | None = None,
    ) -> None:
        c = self.columns
        c["time_s"].append(time_s)
        c["voltage_V"].append(voltage_V)
        c["current_A"].append(current_A)
        c["capacity_Ah"].append(capacity_Ah)
        # No sensor: null on the wire, NULL in the store.
        c["temperature_C"].append(None if math.isnan(temperature_C) else temperature_C)
        c["step"].append(step)
        c["cycle"].append(cycle)
        if reading is not None and reading.frequency_Hz is not None:
            self.impedance = True
            c["frequency_Hz"].append(reading.frequency_Hz)
            c["z_real_ohm"].append(reading.z_real_ohm)
            c["z_imag_ohm"].append(reading.z_imag_ohm)

    def __len__(self) -> int:
        return len(self.columns["time_s"])

    def take(self, seq: int) -> SampleBatch:
        data: dict[str, Any] = {k: self.columns[k] for k in COLUMNS}
        if self.impedance:
            if len(self.columns["frequency_Hz"]) != len(self.columns["time_s"]):
                raise ValueError("an impedance batch mixes points with and without a frequency")
            data.update({k: self.columns[k] for k in IMPEDANCE_COLUMNS})
        # model_construct: the agent built every column itself; validating 100 floats per batch costs the loop.
        batch = SampleBatch.model_construct(
            run_id=self.run_id, channel=self.channel, seq=seq, v=1, kind="samples", **data
        )
        self.columns = _empty_columns()
        self.impedance = False
        return batch


class Batcher:
    """One step's batches: fills a BatchBuilder, flushes it when due, numbers batches in the run's sequence."""

    def __init__(
        self,
        run: RunContext,
        channel: str,
        publish: Callable[[SampleBatch], None],
        batch_size: int = 100,
        max_wall_s: float = 0.1,
    ) -> None:
        self.run = run
        self.builder = BatchBuilder(run.run_id, channel)
        self.publish = publish
        self.batch_size = batch_size
        self.max_wall_s = max_wall_s
        self._last_flush_wall = time.monotonic()

    def __len__(self) -> int:
        return len(self.builder)

    def due(self, last_of_step: bool) -> bool:
        """A batch is due when it holds samples and is full, old, or the step's last."""
        return bool(len(self.builder)) and (
            last_of_step
            or len(self.builder) >= self.batch_size
            or time.monotonic() - self._last_flush_wall > self.max_wall_s
        )

    def flush(self, stats: StepStats) -> None:
        """Publish what the builder holds as the run's next batch (nothing when it is empty)."""
        if not len(self.builder):
            return
        run = self.run
        seq = run.next_seq
        run.next_seq += 1
        run.n_batches += 1
        if stats.first_seq is None:
            stats.first_seq = seq
        stats.last_seq = seq
        self.publish(self.builder.take(seq))
        self._last_flush_wall = time.monotonic()
