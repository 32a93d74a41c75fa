"""Keysight B2900 (B2901A/B2902A/B2911A/B2912A) Precision SMU as a galvanostat/potentiostat, over pyvisa.

Why this third instrument: it is the other SMU family battery labs actually
own next to Keithley's, it speaks a different SCPI dialect (compliance is a
*sense* protection, ``:SENS:VOLT:PROT``; the source mode is
``:SOUR:FUNC:MODE``; both voltage and current come back from one
``:MEAS? (@n)``; its output-off states are ZERO/HIZ/NORMal), and the B2902A
has two channels in one box, addressed by suffix (``:SOUR2``) and channel
list (``(@2)``), which a labtwin channel maps to with ``smu_channel``.
Proving the Potentiostat protocol on a second dialect is what shows the
agent does not secretly depend on one vendor. (The Rodeostat's JSON-lines
protocol and Zahner's serial SCPI are the next candidates; the EmStat
already covers the device-run side.)

Commands as in the Keysight B2900 SCPI Command Reference; the configuration
mirrors the 2450 driver's and for the same reasons: output-off HIZ (never a
0 V source across a cell), 4-wire (``:SENS:REM ON``), error queue drained
after every configuration, output off confirmed. Compliance is a magnitude
here too, so discharges set the channel's ceiling and the agent enforces the
lower cut-off per sample.
"""

from __future__ import annotations

import math
from typing import Literal

from labtwin.devices.potentiostat import Reading
from labtwin.instruments.transport import InstrumentGarbled, Transport, check_range, check_scpi_errors, scpi_output_off

CURRENT_RANGE_A = 3.03  # B2901A/B2902A DC: 3.03 A at up to 6 V (1.515 A to 21 V, 0.105 A to 210 V)
VOLTAGE_RANGE_V = 210.0


def _check(name: str, value: float, low: float, high: float, unit: str) -> float:
    return check_range("B2900", name, value, low, high, unit)


class KeysightB2900:
    """Implements labtwin.devices.potentiostat.Potentiostat on one channel of a Keysight B2900 SMU."""

    model = "b2900"
    voltage_limit_kind = "magnitude"  # labtwin.devices.potentiostat.VoltageLimitKind: a discharge runs to the ceiling
    min_read_interval_s = 0.05  # one :MEAS? at 1 PLC and the round trip (check_interval.py)

    def __init__(
        self,
        transport: Transport,
        *,
        smu_channel: int = 1,
        voltage_ceiling_V: float = 5.0,
        four_wire: bool = True,
        reset: bool = True,
    ) -> None:
        if smu_channel not in (1, 2):
            raise ValueError(f"smu_channel = {smu_channel}: a B2900 has channels 1 and 2")
        self.transport = transport
        self.n = "" if smu_channel == 1 else str(smu_channel)
        self.channel_list = f"(@{smu_channel})"
        self.voltage_ceiling_V = _check("voltage_ceiling_V", voltage_ceiling_V, 0.0, VOLTAGE_RANGE_V, "V")
        self.four_wire = four_wire
        self._mode: Literal["current", "voltage"] | None = None
        if reset:
            self.configure()

    def identify(self) -> str:
        return self.transport.query("*IDN?")

    def configure(self) -> None:
        n, w = self.n, self.transport.write
        w("*RST")
        w(f":OUTP{n}:OFF:MODE HIZ")
        w(f":SENS{n}:REM {'ON' if self.four_wire else 'OFF'}")
        w(f':SENS{n}:FUNC "VOLT","CURR"')
        w(":FORM:ELEM:SENS VOLT,CURR")
        w(f":SOUR{n}:FUNC:MODE CURR")
        w(f":SOUR{n}:CURR 0")
        self._mode = "current"
        self.check_errors("configuration")

    def check_errors(self, context: str) -> None:
        check_scpi_errors(self.transport, "B2900", context)

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        current_A = _check("current_A", current_A, -CURRENT_RANGE_A, CURRENT_RANGE_A, "A")
        limit = voltage_limit_V if current_A > 0 else self.voltage_ceiling_V
        limit = _check("voltage_limit_V", abs(limit), 0.0, VOLTAGE_RANGE_V, "V")
        n, w = self.n, self.transport.write
        w(f":SENS{n}:VOLT:PROT {limit:.6g}")
        w(f":SOUR{n}:CURR {current_A:.6g}")
        if self._mode != "current":
            w(f":SOUR{n}:FUNC:MODE CURR")
            self._mode = "current"
        w(f":OUTP{n} ON")
        self.check_errors("set_current")

    def set_voltage(self, voltage_V: float, current_limit_A: float) -> None:
        voltage_V = _check("voltage_V", voltage_V, -VOLTAGE_RANGE_V, VOLTAGE_RANGE_V, "V")
        current_limit_A = _check("current_limit_A", abs(current_limit_A), 1e-12, CURRENT_RANGE_A, "A")
        n, w = self.n, self.transport.write
        w(f":SENS{n}:CURR:PROT {current_limit_A:.6g}")
        w(f":SOUR{n}:VOLT {voltage_V:.6g}")
        if self._mode != "voltage":
            w(f":SOUR{n}:FUNC:MODE VOLT")
            self._mode = "voltage"
        w(f":OUTP{n} ON")
        self.check_errors("set_voltage")

    def open_circuit(self) -> None:
        self.set_current(0.0, self.voltage_ceiling_V)

    def read(self) -> Reading:
        command = f":MEAS? {self.channel_list}"
        answer = self.transport.query(command)
        try:
            voltage, current = (float(x) for x in answer.split(","))
        except ValueError:
            raise InstrumentGarbled(
                f"{self.transport.resource}: {command} answered {answer!r}, expected voltage,current"
            ) from None
        if max(abs(voltage), abs(current)) > 1e30 or not (math.isfinite(voltage) and math.isfinite(current)):
            raise InstrumentGarbled(f"{self.transport.resource}: {command} answered {answer!r} (overflow)")
        return Reading(voltage_V=voltage, current_A=current)

    def output_off(self) -> None:
        scpi_output_off(self.transport, self.n)

    def close(self) -> None:
        try:
            self.output_off()
        finally:
            self.transport.close()
