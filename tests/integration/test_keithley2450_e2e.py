"""End to end on the wire: Prefect flow -> MQTT -> agent -> Keithley 2450 driver -> pyvisa-py -> TCP ->
emulator -> simulated cell; and what the agent does when the instrument stops answering, garbles or
drops the link mid-step."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from labtwin.cli.wiring import LocalLab
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.documents import Limits
from labtwin.orchestration.flows import run_protocol
from labtwin.physics.library import load_cell
from labtwin.simulators.keithley2450 import Keithley2450Emulator
from labtwin.simulators.scpi_server import ScpiEmulatorThread

pytestmark = pytest.mark.usefixtures("prefect_api")

# The emulated cell lives on the wall clock: at 400x a reading the loaded CI machine delays by 100 ms is 40 s of
# 2C discharge, and the LTO's knee falls through the 0.8 V limit between two readings (seen once in three runs).
SPEED = 200.0
CYCLE = """
metadata: {name: LTO cycle on a 2450, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 5}
safety: {voltage_min_V: 0.8, voltage_max_V: 2.6}
method:
  - rest: {duration_s: 120}
  - cc: {c_rate: -2.0, until: {voltage_V: 1.2, time_s: 2400}}
  - cc: {c_rate: 2.0, until: {voltage_V: 2.5, time_s: 2400}}
"""


def keithley_lab(lab: str, port: int, tmp_path) -> LabConfig:
    return LabConfig(
        lab=lab,
        channels={
            "k1": ChannelConfig(
                driver="keithley2450",
                resource=f"TCPIP::127.0.0.1::{port}::SOCKET",
                speed=SPEED,
                timeout_s=1.0,
                nominal_capacity_Ah=5.18e-5,
                cell_id="LTO-on-2450",
                audit=str(tmp_path / "audit.jsonl"),
                limits=Limits(voltage_min_V=0.8, voltage_max_V=2.6, current_max_A=1e-3),
            )
        },
    )


async def test_a_cycle_runs_through_the_real_driver_and_the_store_holds_what_the_emulator_answered(
    embedded_broker, unique_lab, tmp_path
):
    proto = tmp_path / "cycle.yaml"
    proto.write_text(CYCLE)
    emulator = Keithley2450Emulator(load_cell("lto_bare_thinfilm"), speed=SPEED, seed=5)
    with ScpiEmulatorThread(emulator) as running:
        lab = keithley_lab(unique_lab, running.port, tmp_path)
        async with LocalLab(lab, ["k1"], embedded_broker.url, str(tmp_path / "s.db")) as local:
            summary = await run_protocol(str(proto), "k1", local.url, lab=unique_lab)
            await local.wait_stored(summary.run_id)
            samples = local.store.samples(summary.run_id)
    assert summary.exit_status == "success", summary.reason
    assert summary.steps_run == 3
    assert [s.reason for s in summary.step_ends] == [
        "end_condition:time_s",
        "end_condition:voltage_V",
        "end_condition:voltage_V",
    ]
    stored_v = samples["voltage_V"]
    answered = np.array([m for m, _ in emulator.answered_reads])
    # every reading the instrument answered is a stored sample, in order, to the digit it was sent with
    assert len(stored_v) == len(answered) == summary.n_samples
    assert np.allclose(stored_v, answered, rtol=0, atol=1e-9)
    # 2C half cycles of a 51.8 uAh cell: the charge counted from the readback is near what the cell holds
    discharged = summary.cycles[0].discharge_Ah
    assert 0.5 * 5.18e-5 < discharged < 1.1 * 5.18e-5
    assert emulator.output is False  # the run ended with the output off
    audit = (tmp_path / "audit.jsonl").read_text()
    assert audit.count(':READ? \\"defbuffer1\\", READ, SOUR') == len(answered)


@pytest.mark.parametrize(
    ("fault", "reason_names", "output_off_sent"),
    # pyvisa-py reads a socket the peer closed as silence (its read treats EOF like no data): a timeout
    [
        ("silent", {"InstrumentTimeout"}, True),
        ("garbage", {"InstrumentGarbled"}, True),
        ("close", {"InstrumentConnectionLost", "InstrumentTimeout"}, False),
    ],
)
async def test_an_instrument_fault_mid_step_fails_the_run_with_the_reason_and_keeps_every_sample(
    embedded_broker, unique_lab, tmp_path, fault, reason_names, output_off_sent
):
    proto = tmp_path / "cycle.yaml"
    proto.write_text(CYCLE)
    emulator = Keithley2450Emulator(load_cell("lto_bare_thinfilm"), speed=SPEED, seed=5)
    with ScpiEmulatorThread(emulator) as running:
        lab = keithley_lab(unique_lab, running.port, tmp_path)
        async with LocalLab(lab, ["k1"], embedded_broker.url, str(tmp_path / "s.db")) as local:
            emulator.fault, emulator.fault_after_queries = fault, 40  # strikes during the discharge step
            summary = await asyncio.wait_for(run_protocol(str(proto), "k1", local.url, lab=unique_lab), 60)
            await local.wait_stored(summary.run_id)
            stored = local.store.sample_count(summary.run_id)
            commands = list(emulator.commands_seen)
    assert summary.exit_status == "failed"
    assert summary.step_ends[-1].reason in {f"error:{name}" for name in reason_names}, summary.step_ends
    assert "127.0.0.1" in summary.reason, summary.reason  # the reason names the instrument
    assert stored == summary.n_samples > 0  # nothing already measured is lost
    assert summary.steps_run == 2  # the run stopped at the step the instrument failed in
    if output_off_sent:
        assert ":OUTP OFF" in commands[-3:] or ":OUTP OFF" in commands, commands[-5:]
        assert emulator.output is False
