"""On a real PalmSens EmStat with a 1 kOhm resistor between WE and RE+CE. Skipped unless LABTWIN_EMSTAT holds
its serial port (e.g. /dev/ttyACM0 or COM5). Never wire a battery."""

from __future__ import annotations

import os

import pytest

from labtwin.documents import EisSettings, EndConditions, StepCommand, StepKind
from labtwin.instruments.emstat import EmStat
from labtwin.instruments.transport import SerialLineTransport

PORT = os.environ.get("LABTWIN_EMSTAT")
pytestmark = pytest.mark.skipif(not PORT, reason="no EmStat: set LABTWIN_EMSTAT to its serial port")


def test_chronoamperometry_and_eis_on_a_1_kohm_dummy_cell():
    d = EmStat(SerialLineTransport(PORT, timeout_s=5.0))
    try:
        hold = StepCommand(
            run_id="hw",
            step_index=0,
            step=StepKind.cv,
            voltage_V=0.1,
            end=EndConditions(time_s=3),
            sample_interval_s=0.5,
        )
        readings = list(d.run_technique(hold))
        assert readings and readings[-1].current_A == pytest.approx(1e-4, rel=0.05)
        eis = StepCommand(
            run_id="hw",
            step_index=1,
            step=StepKind.eis,
            end=EndConditions(time_s=120),
            eis=EisSettings(f_start_Hz=1e4, f_end_Hz=10, points_per_decade=2),
        )
        for point in d.run_technique(eis):
            assert abs(complex(point.z_real_ohm, point.z_imag_ohm)) == pytest.approx(1000.0, rel=0.05)
    finally:
        d.close()
