"""On a real Keithley 2450 with a 1 kOhm resistor on its terminals (4-wire). Skipped unless
LABTWIN_KEITHLEY2450 holds its VISA address, e.g. TCPIP::192.168.1.20::5025::SOCKET. Never wire a battery."""

from __future__ import annotations

import os
import time

import pytest

from labtwin.instruments.keithley2450 import Keithley2450
from labtwin.instruments.transport import VisaTransport

ADDRESS = os.environ.get("LABTWIN_KEITHLEY2450")
pytestmark = pytest.mark.skipif(not ADDRESS, reason="no Keithley 2450: set LABTWIN_KEITHLEY2450 to its VISA address")


def test_the_driver_measures_a_1_kohm_dummy_cell():
    k = Keithley2450(VisaTransport(ADDRESS, timeout_s=5.0), voltage_ceiling_V=2.0)
    try:
        assert "2450" in k.identify()
        k.set_current(1e-4, 1.0)
        time.sleep(0.5)
        r = k.read()
        assert r.voltage_V / r.current_A == pytest.approx(1000.0, rel=0.05)
        k.set_voltage(0.1, 1e-3)
        time.sleep(0.5)
        r = k.read()
        assert r.voltage_V / r.current_A == pytest.approx(1000.0, rel=0.05)
    finally:
        k.close()
