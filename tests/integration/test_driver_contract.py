"""The contract every driver and simulator keeps: the Potentiostat protocol, and the same step ends and the same
safety behaviour on the same protocol whether the channel is simulated in-process or a real driver on the wire."""

from __future__ import annotations

import pytest

from labtwin.cli.wiring import LocalLab
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.devices.potentiostat import Potentiostat, RunsTechniques
from labtwin.documents import Limits
from labtwin.instruments.b2900 import KeysightB2900
from labtwin.instruments.emstat import EmStat
from labtwin.instruments.keithley2450 import Keithley2450
from labtwin.orchestration.flows import run_protocol
from labtwin.physics.library import load_cell
from labtwin.simulators.b2900 import KeysightB2900Emulator
from labtwin.simulators.keithley2450 import Keithley2450Emulator
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.simulators.scpi_server import ScpiEmulatorThread

pytestmark = pytest.mark.usefixtures("prefect_api")

LIMITS = Limits(voltage_min_V=0.8, voltage_max_V=2.6, current_max_A=1e-3)
CYCLE = """
metadata: {name: contract cycle, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 5}
safety: {voltage_min_V: 0.8, voltage_max_V: 2.6}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -2.0, until: {voltage_V: 1.2, time_s: 2400}}
  - cc: {c_rate: 2.0, until: {voltage_V: 2.5, time_s: 2400}}
"""
OVERCHARGE = """
metadata: {name: contract overcharge, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 5}
safety: {voltage_min_V: 0.8, voltage_max_V: 2.6}
method:
  - cc: {c_rate: 2.0, until: {time_s: 7200}}
"""


def test_every_driver_and_simulator_is_a_potentiostat():
    for cls in (Keithley2450, KeysightB2900, EmStat, SimulatedPotentiostat):
        for method in ("set_current", "set_voltage", "open_circuit", "read", "output_off"):
            assert callable(getattr(cls, method, None)), (cls, method)
    for cls in (EmStat, SimulatedPotentiostat):
        for method in ("supports", "run_technique", "abort"):
            assert callable(getattr(cls, method, None)), (cls, method)
    assert issubclass(SimulatedPotentiostat, Potentiostat) and issubclass(SimulatedPotentiostat, RunsTechniques)


async def _run(lab: LabConfig, channel: str, text: str, tmp_path, name: str):
    proto = tmp_path / f"{name}.yaml"
    proto.write_text(text)
    async with LocalLab(lab, [channel], lab.broker, str(tmp_path / f"{name}.db")) as local:
        summary = await run_protocol(str(proto), channel, local.url, lab=lab.lab)
        await local.wait_stored(summary.run_id)
    return summary


EMULATORS = {"keithley2450": Keithley2450Emulator, "b2900": KeysightB2900Emulator}


@pytest.mark.parametrize("driver", ["keithley2450", "b2900"])
@pytest.mark.parametrize("protocol", ["cycle", "overcharge"])
async def test_a_simulated_channel_and_an_smu_on_the_wire_end_the_same_steps_the_same_way(
    embedded_broker, unique_lab, tmp_path, protocol, driver
):
    text = CYCLE if protocol == "cycle" else OVERCHARGE
    simulated = LabConfig(
        lab=unique_lab,
        broker=embedded_broker.url,
        channels={
            "sim": ChannelConfig(
                driver="simulated", cell="lto_bare_thinfilm", cell_id="c-sim", speed="max", seed=5, limits=LIMITS
            )
        },
    )
    in_process = await _run(simulated, "sim", text, tmp_path, "sim")
    emulator = EMULATORS[driver](load_cell("lto_bare_thinfilm"), speed=400.0, seed=5)
    with ScpiEmulatorThread(emulator) as running:
        wired = LabConfig(
            lab=unique_lab,
            broker=embedded_broker.url,
            channels={
                "k": ChannelConfig(
                    driver=driver,
                    resource=f"TCPIP::127.0.0.1::{running.port}::SOCKET",
                    speed=400.0,
                    timeout_s=2.0,
                    nominal_capacity_Ah=5.18e-5,
                    cell_id="c-2450",
                    audit=str(tmp_path / "audit.jsonl"),
                    limits=LIMITS,
                )
            },
        )
        on_the_wire = await _run(wired, "k", text, tmp_path, "wire")
        output_after = emulator.output
    assert [e.reason for e in on_the_wire.step_ends] == [e.reason for e in in_process.step_ends]
    assert on_the_wire.exit_status == in_process.exit_status
    if protocol == "cycle":
        assert in_process.exit_status == "success"
        a, b = in_process.cycles[0].discharge_Ah, on_the_wire.cycles[0].discharge_Ah
        assert abs(a - b) < 0.1 * a  # the same cell gives the same charge, whichever way it is reached
    else:
        # the channel's 2.6 V ceiling trips on both, on the first sample above it, and the output ends off
        assert in_process.step_ends[-1].reason == "safety_limit:voltage_max_V" and in_process.exit_status == "failed"
        assert output_after is False
