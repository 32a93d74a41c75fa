"""The Keysight B2900 driver: its transcript (channel 2 of a B2902A), validators, and the real driver over
pyvisa-py against the B2901A emulator."""

from __future__ import annotations

import time

import pytest

from labtwin.devices.potentiostat import Potentiostat
from labtwin.instruments.b2900 import KeysightB2900
from labtwin.instruments.transcript import ScriptedTransport, TranscriptMismatch
from labtwin.instruments.transport import InstrumentError, VisaTransport
from labtwin.physics.library import load_cell
from labtwin.simulators.b2900 import KeysightB2900Emulator
from labtwin.simulators.scpi_server import ScpiEmulatorThread

CONFIGURE_CH2 = [
    ("*RST", None),
    (":OUTP2:OFF:MODE HIZ", None),
    (":SENS2:REM ON", None),
    (':SENS2:FUNC "VOLT","CURR"', None),
    (":FORM:ELEM:SENS VOLT,CURR", None),
    (":SOUR2:FUNC:MODE CURR", None),
    (":SOUR2:CURR 0", None),
    (":SYST:ERR?", '+0,"No error"'),
]


def test_channel_2_configure_charge_hold_read_and_off():
    t = ScriptedTransport(
        CONFIGURE_CH2
        + [
            (":SENS2:VOLT:PROT 4.2", None),
            (":SOUR2:CURR 0.002", None),
            (":OUTP2 ON", None),
            (":SYST:ERR?", '+0,"No error"'),
            (":MEAS? (@2)", "+3.901234567E+00,+2.000001000E-03"),
            (":SENS2:CURR:PROT 0.01", None),
            (":SOUR2:VOLT 4.2", None),
            (":SOUR2:FUNC:MODE VOLT", None),
            (":OUTP2 ON", None),
            (":SYST:ERR?", '+0,"No error"'),
            (":OUTP2 OFF", None),
            (":OUTP2?", "0"),
        ]
    )
    smu = KeysightB2900(t, smu_channel=2, voltage_ceiling_V=4.3)
    assert isinstance(smu, Potentiostat)
    smu.set_current(2e-3, 4.2)
    r = smu.read()
    assert (r.voltage_V, r.current_A) == (3.901234567, 2.000001e-3)
    smu.set_voltage(4.2, 0.01)
    smu.output_off()
    t.assert_done()


def test_a_missing_error_check_and_a_bad_value_are_caught():
    with pytest.raises(TranscriptMismatch, match="not sent"):
        t = ScriptedTransport(CONFIGURE_CH2 + [(":OUTP2 OFF", None)])
        KeysightB2900(t, smu_channel=2)
        t.assert_done()
    smu = KeysightB2900(ScriptedTransport(CONFIGURE_CH2), smu_channel=2)
    with pytest.raises(ValueError, match=r"current_A = 5 A is outside the B2900's range"):
        smu.set_current(5.0, 4.0)
    with pytest.raises(ValueError, match="smu_channel"):
        KeysightB2900(ScriptedTransport([]), smu_channel=3)


def test_the_driver_runs_the_emulated_b2901a_through_pyvisa():
    emulator = KeysightB2900Emulator(load_cell("lto_bare_thinfilm"), speed=100.0, seed=1)
    with ScpiEmulatorThread(emulator) as running:
        smu = KeysightB2900(
            VisaTransport(f"TCPIP::127.0.0.1::{running.port}::SOCKET", timeout_s=2.0), voltage_ceiling_V=3.0
        )
        assert smu.identify().startswith("Keysight Technologies,B2901A")
        smu.open_circuit()
        ocv = smu.read()
        smu.set_current(-1e-4, 1.0)
        time.sleep(0.3)
        loaded = smu.read()
        assert loaded.current_A == pytest.approx(-1e-4) and loaded.voltage_V < ocv.voltage_V
        smu.transport.write(":SOUR:CURR 9")  # beyond the 3.03 A range: the instrument refuses, the driver reports it
        with pytest.raises(InstrumentError, match='-222 "Data out of range"'):
            smu.check_errors("the test")
        smu.output_off()
        assert emulator.output is False and emulator.off_mode == "HIZ" and emulator.remote_sense
        smu.transport.close()
