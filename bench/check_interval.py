"""Checks faster than records (issue 14): the overshoot past a cut-off before and after, and readings per record.

One protocol, a 1C discharge of the bare LTO thin film (lto-thin-film) to 1.0 V with ``record: {interval_s: 5}``,
run through the whole path (Prefect flow, MQTT, agent, driver) four ways in one go:

- the Keithley 2450 emulator over its socket, the agent reading only at the record interval: the reference,
  what issue 14 measured (the driver's fastest reading set to the record interval, so the check planner
  cannot read sooner);
- the same with the agent's check interval (check_interval.py): the "after";
- the dry-run's simulated channel as it was (it clamps a cc step at its cut-off), read at the record interval;
- the dry-run's simulated channel standing for the 2450 (its compliance, no clamp), with the check interval.

Per run: how the discharge ended, its last voltage, the overshoot past 1.0 V in mV, the readings the agent
took and the samples it recorded (the whole run) and readings per record.

    python bench/check_interval.py [--speed 200]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.config.lab import ChannelConfig, LabConfig  # noqa: E402
from labtwin.documents import Limits  # noqa: E402
from labtwin.orchestration.flows import run_protocol, start_prefect_api  # noqa: E402
from labtwin.physics.library import load_cell  # noqa: E402
from labtwin.simulators.keithley2450 import Keithley2450Emulator  # noqa: E402
from labtwin.simulators.scpi_server import ScpiEmulatorThread  # noqa: E402

CELL = "lto-thin-film"
CUTOFF_V = 1.0
RECORD_S = 5.0
PROTOCOL = f"""
metadata: {{name: LTO 1C discharge to {CUTOFF_V} V, nominal_capacity_Ah: 5.18e-5}}
record: {{interval_s: {RECORD_S}}}
safety: {{voltage_min_V: 0.8, voltage_max_V: 2.6}}
method:
  - rest: {{duration_s: 30}}
  - cc: {{c_rate: -1.0, until: {{voltage_V: {CUTOFF_V}}}}}
"""
LIMITS = Limits(voltage_min_V=0.8, voltage_max_V=2.6, current_max_A=1e-3)


def count_reads(driver) -> list[int]:
    """Counts the driver's readings (the stand-in has no SCPI log to count them from)."""
    counter = [0]
    read = driver.read

    def counted():
        counter[0] += 1
        return read()

    driver.read = counted
    return counter


async def one_run(name: str, channel: ChannelConfig, proto: Path, store: Path, adaptive: bool) -> dict:
    lab = LabConfig(lab=f"bench{name}", channels={"k1": channel})
    async with LocalLab(lab, ["k1"], None, str(store)) as local:
        driver = local.agents["k1"].driver
        if not adaptive:
            driver.min_read_interval_s = RECORD_S  # the planner's floor at the record interval: fixed reading
        reads = count_reads(driver)
        summary = await run_protocol(str(proto), "k1", local.url, lab=lab.lab)
        await local.wait_stored(summary.run_id)
        samples = local.store.samples(summary.run_id)
    end = summary.step_ends[1] if len(summary.step_ends) > 1 else summary.step_ends[-1]
    end_V = float(samples["voltage_V"][samples["step"] == 1][-1])
    records = summary.n_samples
    return {
        "run": name,
        "end": end.reason,
        "end_V": end_V,
        "overshoot_mV": max(0.0, (CUTOFF_V - end_V) * 1e3),
        "reads": reads[0],
        "records": records,
        "status": summary.exit_status,
    }


async def main(speed: float) -> None:
    await start_prefect_api()
    cell = load_cell(CELL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proto = Path(tmp) / "discharge.yaml"
        proto.write_text(PROTOCOL)
        for adaptive in (False, True):
            emulator = Keithley2450Emulator(cell, speed=speed, seed=5)
            with ScpiEmulatorThread(emulator) as running:
                channel = ChannelConfig(
                    driver="keithley2450",
                    resource=f"TCPIP::127.0.0.1::{running.port}::SOCKET",
                    speed=speed,
                    timeout_s=2.0,
                    nominal_capacity_Ah=cell.nominal_capacity_Ah,
                    audit=str(Path(tmp) / "audit.jsonl"),
                    limits=LIMITS,
                )
                label = "2450 emulator, " + ("check interval" if adaptive else "reads at record interval")
                rows.append(await one_run(label, channel, proto, Path(tmp) / f"k{adaptive}.db", adaptive))
        for stands_for, adaptive in ((None, False), ("keithley2450", True)):
            channel = ChannelConfig(driver="simulated", cell=CELL, seed=0, limits=LIMITS, stands_for=stands_for)
            label = "stand-in for the 2450, check interval" if stands_for else "simulated (clamps), record interval"
            rows.append(await one_run(label, channel, proto, Path(tmp) / f"s{adaptive}.db", adaptive))
    print(f"1C discharge of {CELL} to {CUTOFF_V} V, record interval {RECORD_S:g} s, emulator at {speed:g}x")
    print(f"{'run':44} {'ended on':30} {'end V':>8} {'overshoot mV':>12} {'reads':>6} {'records':>7} {'reads/rec':>9}")
    for r in rows:
        print(
            f"{r['run']:44} {r['end']:30} {r['end_V']:8.4f} {r['overshoot_mV']:12.1f} {r['reads']:6d} "
            f"{r['records']:7d} {r['reads'] / max(r['records'], 1):9.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed", type=float, default=200.0, help="the emulator's cell seconds per wall second")
    asyncio.run(main(parser.parse_args().speed))
