"""The Keithley 2450 driver: transcripts (wrong and missing commands fail), validators, and the real
driver over pyvisa-py against the wire-level emulator (raw socket and the serial code path)."""

from __future__ import annotations

import time

import pytest

from labtwin.devices.potentiostat import Potentiostat
from labtwin.instruments.keithley2450 import Keithley2450
from labtwin.instruments.transcript import ScriptedTransport, TranscriptMismatch
from labtwin.instruments.transport import InstrumentError, VisaTransport
from labtwin.physics.library import load_cell
from labtwin.simulators.keithley2450 import Keithley2450Emulator
from labtwin.simulators.scpi_server import ScpiEmulatorThread

CONFIGURE = [
    ("*RST", None),
    (":OUTP:CURR:SMOD HIMP", None),
    (":OUTP:VOLT:SMOD HIMP", None),
    (":SENS:VOLT:RSEN ON", None),
    (":SENS:CURR:RSEN ON", None),
    (":SOUR:CURR:READ:BACK ON", None),
    (":SOUR:VOLT:READ:BACK ON", None),
    (":SOUR:FUNC CURR", None),
    (':SENS:FUNC "VOLT"', None),
    (":SOUR:CURR 0", None),
    (":SYST:ERR?", '0,"No error"'),
]


def test_configure_charge_read_and_off_send_exactly_the_manuals_commands():
    t = ScriptedTransport(
        CONFIGURE
        + [
            (":SOUR:CURR:VLIM 4.2", None),
            (":SOUR:CURR 0.001", None),
            (":OUTP ON", None),
            (":SYST:ERR?", '0,"No error"'),
            (':READ? "defbuffer1", READ, SOUR', "3.712345e+00,1.000002e-03"),
            (":SOUR:VOLT:ILIM 0.0005", None),
            (":SOUR:VOLT 4.2", None),
            (":SOUR:FUNC VOLT", None),
            (':SENS:FUNC "CURR"', None),
            (":OUTP ON", None),
            (":SYST:ERR?", '0,"No error"'),
            (':READ? "defbuffer1", READ, SOUR', "2.5e-04,4.2e+00"),
            (":OUTP OFF", None),
            (":OUTP?", "0"),
        ]
    )
    k = Keithley2450(t, voltage_ceiling_V=4.3)
    assert isinstance(k, Potentiostat)
    k.set_current(1e-3, 4.2)
    r = k.read()
    assert (r.voltage_V, r.current_A) == (3.712345, 1.000002e-3)
    k.set_voltage(4.2, 5e-4)
    r = k.read()  # voltage mode: the reading is the current, the source readback the voltage
    assert (r.voltage_V, r.current_A) == (4.2, 2.5e-4)
    k.output_off()
    t.assert_done()


def test_a_discharge_sets_the_ceiling_as_compliance_because_the_2450_limit_is_a_magnitude():
    t = ScriptedTransport(
        CONFIGURE
        + [
            (":SOUR:CURR:VLIM 4.3", None),
            (":SOUR:CURR -0.002", None),
            (":OUTP ON", None),
            (":SYST:ERR?", '0,"No error"'),
        ]
    )
    Keithley2450(t, voltage_ceiling_V=4.3).set_current(-2e-3, 2.5)
    t.assert_done()


def test_the_transcript_catches_a_wrong_and_a_missing_command():
    wrong = [(c, a) if c != ":OUTP:VOLT:SMOD HIMP" else (":OUTP:VOLT:SMOD NORM", a) for c, a in CONFIGURE]
    with pytest.raises(TranscriptMismatch, match="OUTP:VOLT:SMOD"):
        Keithley2450(ScriptedTransport(wrong))
    longer = ScriptedTransport(CONFIGURE + [(":OUTP OFF", None)])
    Keithley2450(longer)
    with pytest.raises(TranscriptMismatch, match="not sent"):
        longer.assert_done()


def test_out_of_range_settings_raise_naming_the_field_and_send_nothing():
    t = ScriptedTransport(CONFIGURE)
    k = Keithley2450(t)
    with pytest.raises(ValueError, match=r"current_A = 2 A is outside .* \[-1.05, 1.05\]"):
        k.set_current(2.0, 4.0)
    with pytest.raises(ValueError, match="current_limit_A"):
        k.set_voltage(1.0, 0.0)
    with pytest.raises(ValueError, match="voltage_V"):
        k.set_voltage(float("nan"), 1e-3)
    t.assert_done()  # nothing beyond the configuration went out


def test_an_error_in_the_queue_raises_with_every_error_listed():
    t = ScriptedTransport(
        CONFIGURE[:-1]
        + [
            (":SYST:ERR?", '-113,"Undefined header"'),
            (":SYST:ERR?", '-222,"Data out of range"'),
            (":SYST:ERR?", '0,"No error"'),
        ]
    )
    with pytest.raises(InstrumentError, match='-113 "Undefined header"; -222 "Data out of range"'):
        Keithley2450(t)


@pytest.fixture()
def emulator():
    emu = Keithley2450Emulator(load_cell("lto_bare_thinfilm"), speed=100.0, seed=3)
    with ScpiEmulatorThread(emu) as running:
        yield emu, running.port


@pytest.mark.parametrize("address", ["TCPIP::127.0.0.1::{port}::SOCKET", "ASRLsocket://127.0.0.1:{port}::INSTR"])
def test_the_driver_runs_the_emulated_cell_through_pyvisa(emulator, address, tmp_path):
    from labtwin.instruments.transport import AuditTrail

    emu, port = emulator
    audit = tmp_path / "audit.jsonl"
    k = Keithley2450(
        VisaTransport(address.format(port=port), timeout_s=2.0, audit=AuditTrail(audit)), voltage_ceiling_V=3.0
    )
    assert k.identify().startswith("KEITHLEY INSTRUMENTS,MODEL 2450")
    k.open_circuit()
    ocv = k.read()
    assert ocv.current_A == 0.0 and 1.0 < ocv.voltage_V < 3.0
    k.set_current(-1e-4, 1.0)  # ~2C discharge: the 2450 cannot hold a lower bound, the ceiling is its limit
    discharge = []
    for _ in range(30):
        time.sleep(0.02)
        discharge.append(k.read())
    assert all(abs(r.current_A + 1e-4) < 1e-9 for r in discharge)
    assert discharge[-1].voltage_V < discharge[0].voltage_V < ocv.voltage_V  # discharging polarizes down
    limit = discharge[-1].voltage_V + 0.03
    k.set_current(1e-4, limit)  # charge into a compliance just above: the instrument clamps there
    charge = []
    for _ in range(60):
        time.sleep(0.02)
        charge.append(k.read())
    assert all(r.voltage_V <= limit + 1e-3 for r in charge)  # within the cell file's 0.2 mV noise
    assert charge[-1].voltage_V == pytest.approx(limit, abs=1e-3) and charge[-1].current_A < 1e-4  # CV regime: tapering
    k.output_off()
    assert emu.output is False and emu.off_state == {"CURR": "HIMP", "VOLT": "HIMP"}
    assert emu.remote_sense == {"VOLT": True, "CURR": True}
    lines = audit.read_text().splitlines()
    assert any('"> "' in line or '">"' in line for line in lines) and any(":OUTP OFF" in line for line in lines)
    k.transport.close()


def test_a_bad_command_lands_in_the_emulators_error_queue_and_the_driver_reports_it(emulator):
    emu, port = emulator
    t = VisaTransport(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout_s=2.0)
    k = Keithley2450(t)
    t.write(":SOURce:CURRent:VLIMit 500")  # long form parses; 500 V is beyond the range
    t.write(":SOUR:CURRX 1")
    with pytest.raises(InstrumentError, match=r'-222 "Data out of range"; -113 "Undefined header"'):
        k.check_errors("the test's commands")
    t.close()
