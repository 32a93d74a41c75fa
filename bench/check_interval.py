"""Checks faster than records (issue 14): the overshoot past a cut-off before and after, and readings per record.

One protocol, a 1C discharge of an LTO thin film to 1.0 V with ``record: {interval_s: 5}``, run through the
whole path (Prefect flow, MQTT, agent, driver) five ways in one go:

- the Keithley 2450 emulator over its socket, the agent reading at the step's fixed sample interval: the
  reference, what issue 14 measured (the driver's fastest reading set beyond the sample interval, so the check
  planner cannot read sooner);
- the same with the agent's check interval (check_interval.py): the "after";
- the dry-run's simulated channel as it was (it clamps a cc step at its cut-off), fixed reading;
- the simulated channel standing for the 2450 (its compliance, no clamp), fixed reading and check interval.

``--cell lto-thin-film`` is the many-particle film of the issue's probe, whose voltage falls at 1.4 V/s once
the host is full; ``--check-bound S`` sets the channel's sample_interval_max_s (the compiler then reads every S
and records every 5 s).

Per run: how the discharge ended, its last voltage, the overshoot past 1.0 V in mV, the readings the agent
took and the samples it recorded (the whole run) and readings per record.

    python bench/check_interval.py [--cell lto_bare_thinfilm] [--speed 200] [--check-bound S]
    python bench/check_interval.py --cell lto-thin-film --check-bound 0.2 --speed 1 --initial-x 0.995  # emulator only
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
NOT_SOONER_S = 1e9  # a driver's fastest reading set this slow: the planner cannot read before the sample interval


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
    lab = LabConfig(lab=f"bench-{store.stem}", channels={"k1": channel})
    async with LocalLab(lab, ["k1"], None, str(store)) as local:
        driver = local.agents["k1"].driver
        if not adaptive:
            driver.min_read_interval_s = NOT_SOONER_S  # the planner's floor at the sample interval: fixed reading
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


async def main(cell_name: str, speed: float, bound_s: float | None, initial_x: float | None = None) -> None:
    await start_prefect_api()
    cell = load_cell(cell_name)
    if initial_x is not None:  # a many-particle film started near full, so a run at 1x or 2x takes a minute
        positive = cell.parameters.positive.model_copy(update={"initial_x": initial_x})
        cell = cell.model_copy(update={"parameters": cell.parameters.model_copy(update={"positive": positive})})
    limits = LIMITS.model_copy(update={"sample_interval_max_s": bound_s})
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
                    limits=limits,
                )
                label = "2450 emulator, " + ("check interval" if adaptive else "fixed reading")
                rows.append(await one_run(label, channel, proto, Path(tmp) / f"k{int(adaptive)}.db", adaptive))
        for stands_for, adaptive in ((None, False), ("keithley2450", False), ("keithley2450", True)):
            if initial_x is not None:
                break  # a simulated channel takes its cell by name: the file's initial state
            channel = ChannelConfig(driver="simulated", cell=cell_name, seed=0, limits=limits, stands_for=stands_for)
            label = ("stand-in for the 2450, " if stands_for else "simulated (clamps), ") + (
                "check interval" if adaptive else "fixed reading"
            )
            store = Path(tmp) / f"s{int(stands_for is not None)}{int(adaptive)}.db"
            rows.append(await one_run(label, channel, proto, store, adaptive))
    bound = f"checks at least every {bound_s:g} s" if bound_s else "no sample_interval_max_s"
    print(
        f"1C discharge of {cell_name} to {CUTOFF_V} V, record interval {RECORD_S:g} s, {bound}, emulator at {speed:g}x"
    )
    print(f"{'run':40} {'ended on':30} {'end V':>8} {'overshoot mV':>12} {'reads':>6} {'records':>7} {'reads/rec':>9}")
    for r in rows:
        print(
            f"{r['run']:40} {r['end']:30} {r['end_V']:8.4f} {r['overshoot_mV']:12.1f} {r['reads']:6d} "
            f"{r['records']:7d} {r['reads'] / max(r['records'], 1):9.2f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lto_bare_thinfilm", help="lto_bare_thinfilm (ECM) or lto-thin-film")
    parser.add_argument("--speed", type=float, default=200.0, help="the emulator's cell seconds per wall second")
    parser.add_argument("--check-bound", type=float, default=None, help="the channel's sample_interval_max_s")
    parser.add_argument("--initial-x", type=float, default=None, help="lto-thin-film: lithium fraction at the start")
    args = parser.parse_args()
    asyncio.run(main(args.cell, args.speed, args.check_bound, args.initial_x))
