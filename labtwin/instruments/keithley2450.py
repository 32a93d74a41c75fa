"""Keithley 2450 SourceMeter as a galvanostat/potentiostat for host-timed steps (native 2450 SCPI set).

Commands follow the Model 2450 Reference Manual (2450-901-01), SCPI command
reference. The instrument must be in its default "SCPI" command set (not
"SCPI 2400" emulation, not TSP). How a battery sits on an SMU, and why the
configuration below looks the way it does:

- **Output-off state HIMP.** ``:OUTP:CURR:SMOD HIMP`` / ``:OUTP:VOLT:SMOD
  HIMP`` opens the output relay when the output goes off. The factory state
  (NORMal) turns "off" into a 0 V source: across a charged cell that is a
  discharge into the instrument. Set first, before anything can turn on.
- **Four-wire sensing** (``:SENS:VOLT:RSEN ON``) so lead resistance at
  milliamperes does not read as cell polarization.
- **Rest = 0 A current source, measuring voltage.** An SMU has no open
  circuit it can measure through; a current source at zero is the standard
  high-impedance voltmeter (~10 GOhm) a battery tester uses.
- **Compliance is a magnitude.** ``:SOUR:CURR:VLIM`` limits |V|. Charging
  (current > 0) it is the upper voltage the cell may reach, and a CCCV charge
  is exactly a current source regulating at its limit. Discharging it cannot
  express a LOWER bound: the driver sets it to ``voltage_ceiling_V`` (the
  channel's maximum) and the lower cut-off is the agent's per-sample check
  and the step's end condition. Both live in the agent next to the
  instrument, every sample, as DESIGN.md requires.
- **One reading per sample:** ``:READ? "defbuffer1", READ, SOUR`` gives the
  measured quantity and the source value; with source readback on
  (``:SOUR:CURR:READ:BACK ON``) the source value is measured, not programmed.
  In current mode the reading is the voltage; in voltage mode the sense
  function is current and the roles swap.
- ``:SYST:ERR?`` is read after every configuration; any error raises.

Validators raise on out-of-range values with the field and the range; they
never clip (a silently clipped current is a different experiment).
"""

from __future__ import annotations

import math
from typing import Literal

from labtwin.devices.potentiostat import Reading
from labtwin.instruments.transport import InstrumentGarbled, Transport, check_range, check_scpi_errors, scpi_output_off

CURRENT_RANGE_A = 1.05  # the 2450's largest current range (source and measure)
VOLTAGE_RANGE_V = 210.0
VOLTAGE_LIMIT_MIN_V = 0.02  # smallest :SOUR:CURR:VLIM the 2450 accepts
CURRENT_LIMIT_MIN_A = 1e-9  # smallest :SOUR:VOLT:ILIM


def _check(name: str, value: float, low: float, high: float, unit: str) -> float:
    return check_range("Keithley 2450", name, value, low, high, unit)


class Keithley2450:
    """Implements labtwin.devices.potentiostat.Potentiostat on a Keithley 2450 over any ``Transport``."""

    model = "keithley2450"
    voltage_limit_kind = "magnitude"  # labtwin.devices.potentiostat.VoltageLimitKind: a discharge runs to the ceiling
    min_read_interval_s = 0.05  # one :READ? at 1 PLC with autozero, and the round trip (check_interval.py)

    def __init__(
        self, transport: Transport, *, voltage_ceiling_V: float = 5.0, four_wire: bool = True, reset: bool = True
    ) -> None:
        self.transport = transport
        self.voltage_ceiling_V = _check(
            "voltage_ceiling_V", voltage_ceiling_V, VOLTAGE_LIMIT_MIN_V, VOLTAGE_RANGE_V, "V"
        )
        self.four_wire = four_wire
        self._mode: Literal["current", "voltage"] | None = None
        if reset:
            self.configure()

    # ------------------------------------------------------------------ configuration

    def identify(self) -> str:
        return self.transport.query("*IDN?")

    def configure(self) -> None:
        """Reset to a known state that is safe for a cell: output off and disconnected, 0 A, 4-wire."""
        w = self.transport.write
        w("*RST")
        w(":OUTP:CURR:SMOD HIMP")
        w(":OUTP:VOLT:SMOD HIMP")
        sense = "ON" if self.four_wire else "OFF"
        w(f":SENS:VOLT:RSEN {sense}")
        w(f":SENS:CURR:RSEN {sense}")
        w(":SOUR:CURR:READ:BACK ON")
        w(":SOUR:VOLT:READ:BACK ON")
        self._current_mode()
        w(":SOUR:CURR 0")
        self.check_errors("configuration")

    def check_errors(self, context: str) -> None:
        check_scpi_errors(self.transport, "2450", context)

    def _current_mode(self) -> None:
        self.transport.write(":SOUR:FUNC CURR")
        self.transport.write(':SENS:FUNC "VOLT"')
        self._mode = "current"

    # ------------------------------------------------------------------ Potentiostat protocol

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        current_A = _check("current_A", current_A, -CURRENT_RANGE_A, CURRENT_RANGE_A, "A")
        limit = voltage_limit_V if current_A > 0 else self.voltage_ceiling_V
        limit = _check("voltage_limit_V", abs(limit), VOLTAGE_LIMIT_MIN_V, VOLTAGE_RANGE_V, "V")
        w = self.transport.write
        if self._mode != "current":
            self._current_mode()
        w(f":SOUR:CURR:VLIM {limit:.6g}")
        w(f":SOUR:CURR {current_A:.6g}")
        w(":OUTP ON")
        self.check_errors("set_current")

    def set_voltage(self, voltage_V: float, current_limit_A: float) -> None:
        voltage_V = _check("voltage_V", voltage_V, -VOLTAGE_RANGE_V, VOLTAGE_RANGE_V, "V")
        current_limit_A = _check("current_limit_A", abs(current_limit_A), CURRENT_LIMIT_MIN_A, CURRENT_RANGE_A, "A")
        w = self.transport.write
        # Level and limit first, then the function: the source never steps to a stale level across the cell.
        w(f":SOUR:VOLT:ILIM {current_limit_A:.6g}")
        w(f":SOUR:VOLT {voltage_V:.6g}")
        if self._mode != "voltage":
            w(":SOUR:FUNC VOLT")
            w(':SENS:FUNC "CURR"')
            self._mode = "voltage"
        w(":OUTP ON")
        self.check_errors("set_voltage")

    def open_circuit(self) -> None:
        w = self.transport.write
        if self._mode != "current":
            self._current_mode()
        w(f":SOUR:CURR:VLIM {self.voltage_ceiling_V:.6g}")
        w(":SOUR:CURR 0")
        w(":OUTP ON")
        self.check_errors("open_circuit")

    def read(self) -> Reading:
        command = ':READ? "defbuffer1", READ, SOUR'
        answer = self.transport.query(command)
        try:
            measured, source = (float(x) for x in answer.split(","))
        except ValueError:
            raise InstrumentGarbled(
                f"{self.transport.resource}: {command} answered {answer!r}, expected two numbers"
            ) from None
        if not (math.isfinite(measured) and math.isfinite(source)) or max(abs(measured), abs(source)) > 1e30:
            raise InstrumentGarbled(f"{self.transport.resource}: {command} answered {answer!r} (overflow)")
        if self._mode == "voltage":
            return Reading(voltage_V=source, current_A=measured)
        return Reading(voltage_V=measured, current_A=source)

    def output_off(self) -> None:
        scpi_output_off(self.transport)

    def close(self) -> None:
        try:
            self.output_off()
        finally:
            self.transport.close()
