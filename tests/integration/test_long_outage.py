"""A broker outage at wall-clock pace on the Keithley 2450 emulator: the network is not in the safety loop.

Measured before the spool (issue 14): with the broker down long enough to fill the outbox, the agent's sample
loop blocked, the cell went 42 s without a reading while current flowed, and the voltage limit tripped only when
the broker came back, at 3.7226 V against 3.65 V. Here the broker (a Mosquitto the test starts) is killed as the
protocol's last step, an 8C charge on time alone, begins, and stays down until the step has had to trip the
channel's 2.6 V limit. The emulated cell keeps the wall clock (50x), read over its socket by the real driver.

Asserted: readings went on at the step's pace throughout the outage; the limit tripped while the broker was
down, with at most one sample over it; when the broker returned, the flow learnt how the step ended, the run
failed on that limit, and the store has every sample exactly once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from labtwin.cli.wiring import LocalLab
from labtwin.physics.library import load_cell
from labtwin.simulators.keithley2450 import Keithley2450Emulator
from labtwin.simulators.scpi_server import ScpiEmulatorThread
from tests.integration.test_keithley2450_e2e import keithley_lab
from tests.mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.usefixtures("prefect_api")

SPEED = 50.0  # cell seconds per wall second; one reading per cell second is one every 20 ms of wall time
PROTOCOL = """
metadata: {name: LTO on a 2450 across a broker outage, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 1}
safety: {voltage_min_V: 0.8, voltage_max_V: 2.6}
method:
  - rest: {duration_s: 20}
  - cc: {c_rate: -8.0, until: {voltage_V: 1.2}}
  - cc: {c_rate: 8.0, until: {time_s: 3000}}
"""


class TimedEmulator(Keithley2450Emulator):
    """The emulator, noting the wall time of every reading it answers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_times: list[float] = []

    def _measure(self):
        self.read_times.append(time.monotonic())
        return super()._measure()


async def test_with_the_broker_down_the_agent_reads_on_and_trips_the_limit_itself(unique_lab, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proto = tmp_path / "outage.yaml"
    proto.write_text(PROTOCOL)
    emulator = TimedEmulator(load_cell("lto_bare_thinfilm"), speed=SPEED, seed=5)
    broker = MosquittoProcess(tmp_path / "broker").start()
    try:
        with ScpiEmulatorThread(emulator) as running:
            lab = keithley_lab(unique_lab, running.port, tmp_path)
            lab.channels["k1"].speed = SPEED
            async with LocalLab(lab, ["k1"], broker.url, str(tmp_path / "s.db")) as local:
                from labtwin.orchestration.flows import run_protocol

                flow = asyncio.create_task(run_protocol(str(proto), "k1", local.url, lab=unique_lab))
                agent = local.agents["k1"]
                deadline = time.monotonic() + 90
                while agent.control.current is None or agent.control.current.step_index != 2:
                    assert not flow.done() and time.monotonic() < deadline, "the charge never started"
                    await asyncio.sleep(0.01)
                broker.kill()
                down_at = time.monotonic()
                tripped_at = None
                while time.monotonic() - down_at < 40:
                    if tripped_at is None and agent.run is not None and agent.run.tripped is not None:
                        tripped_at = time.monotonic()
                    if tripped_at is not None and time.monotonic() - tripped_at > 2:
                        break
                    await asyncio.sleep(0.01)
                up_at = time.monotonic()
                broker.start()
                summary = await asyncio.wait_for(flow, 120)
                await local.wait_stored(summary.run_id, 60)
                samples = local.store.samples(summary.run_id)
                seqs = local.store.seqs(summary.run_id)
                stored = local.store.sample_count(summary.run_id)
    finally:
        broker.kill()
    assert tripped_at is not None and down_at < tripped_at < up_at, "the limit did not trip while the broker was down"
    during = [t for t in emulator.read_times if down_at < t < tripped_at]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    print(
        f"outage {up_at - down_at:.1f} s; trip {tripped_at - down_at:.1f} s in; {len(during)} readings, max gap {max(gaps):.3f} s"
    )
    assert len(during) > 10 and max(gaps) < 0.5, "readings stalled while the broker was away"
    assert summary.exit_status == "failed" and summary.reason.startswith("step 2: safety_limit:voltage_max_V"), summary
    assert (samples["voltage_V"] > 2.6).sum() <= 1, "the limit tripped late"
    assert stored == summary.n_samples and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert emulator.output is False
