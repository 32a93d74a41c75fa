"""On a real Keysight B2900 with a 1 kOhm resistor on the channel (4-wire). Skipped unless LABTWIN_B2900 holds
its VISA address (and LABTWIN_B2900_CHANNEL the SMU channel, default 1). Never wire a battery."""

from __future__ import annotations

import os
import time

import pytest

from labtwin.instruments.b2900 import KeysightB2900
from labtwin.instruments.transport import VisaTransport

ADDRESS = os.environ.get("LABTWIN_B2900")
pytestmark = pytest.mark.skipif(not ADDRESS, reason="no Keysight B2900: set LABTWIN_B2900 to its VISA address")


def test_the_driver_measures_a_1_kohm_dummy_cell():
    smu = KeysightB2900(
        VisaTransport(ADDRESS, timeout_s=5.0),
        smu_channel=int(os.environ.get("LABTWIN_B2900_CHANNEL", "1")),
        voltage_ceiling_V=2.0,
    )
    try:
        assert "B29" in smu.identify()
        smu.set_current(1e-4, 1.0)
        time.sleep(0.5)
        r = smu.read()
        assert r.voltage_V / r.current_A == pytest.approx(1000.0, rel=0.05)
    finally:
        smu.close()
