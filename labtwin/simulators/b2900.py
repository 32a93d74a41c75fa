"""A Keysight B2901A at the wire: the SCPI the B2900 driver uses, on TCP, with a simulated cell on channel 1.

State as the command reference describes it: source mode and per-function
levels, compliance as sense protection (magnitude), remote sense, output and
its off mode (ZERO, HIZ, NORMal: ZERO and NORMal keep a 0 V source on the
terminals), an error queue (``+0,"No error"`` when empty, as the B2900
formats it). ``:MEAS? (@1)`` answers ``voltage,current``. It plugs into the
same TCP server and fault machinery as the 2450 emulator.
"""

from __future__ import annotations

import numpy as np

from labtwin.devices import scpi
from labtwin.devices.clock import ScaledWallClock
from labtwin.devices.scpi import Command, ScpiError
from labtwin.physics.library import CellDefinition
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.simulators.scpi_server import ScpiInstrument

IDN = "Keysight Technologies,B2901A,LABTWIN-EMU,3.4.2011.5100"
CURRENT_RANGE_A = 3.03
VOLTAGE_RANGE_V = 210.0
OFF_MODES = {"ZERO": "ZERO", "HIZ": "HIZ", "NORMAL": "NORM"}
FUNCTIONS = {"CURRENT": "CURR", "VOLTAGE": "VOLT"}


class KeysightB2900Emulator(ScpiInstrument):
    def __init__(self, cell: CellDefinition, *, speed: float = 1.0, seed: int | None = None) -> None:
        self.cell = cell
        self.clock = ScaledWallClock(speed)
        self.potentiostat = SimulatedPotentiostat(cell, self.clock, np.random.default_rng(seed))
        super().__init__()
        self.reset()
        self.off_mode = "HIZ"  # a battery lab's saved power-on setup (see the 2450 emulator)
        self._apply()

    def reset(self) -> None:
        self.mode = "VOLT"
        self.level = {"CURR": 0.0, "VOLT": 0.0}
        self.protection = {"VOLT": 2.0, "CURR": 1e-4}  # *RST compliance: 2 V / 100 uA (reference manual defaults)
        self.remote_sense = False
        self.output = False
        self.off_mode = "NORM"
        self.errors.clear()
        self._apply()

    def _apply(self) -> None:
        p = self.potentiostat
        if not self.output:
            if self.off_mode == "HIZ":
                p.output_off()
            else:
                p.set_voltage(0.0, self.protection["CURR"])
        elif self.mode == "CURR":
            level = self.level["CURR"]
            limit = self.protection["VOLT"]
            p.set_current(level, limit if level >= 0 else -limit)
        else:
            p.set_voltage(self.level["VOLT"], self.protection["CURR"])

    def _execute(self, c: Command) -> str | None:  # noqa: C901 - a dispatch table that reads like the manual
        h = c.header
        if h == "*IDN" and c.query:
            return IDN
        if h == "*RST":
            self.reset()
            return None
        if h == "*CLS":
            self.errors.clear()
            return None
        if h in ("SYST:ERR", "SYST:ERR:NEXT") and c.query:
            code, message = self.next_error()
            return f'{code:+d},"{message}"'
        if h == "SOUR:FUNC:MODE":
            if c.query:
                return self.mode
            self.mode = scpi.choice(c, FUNCTIONS)
            self._apply()
            return None
        for function, bound in (("CURR", CURRENT_RANGE_A), ("VOLT", VOLTAGE_RANGE_V)):
            if h in (f"SOUR:{function}", f"SOUR:{function}:LEV", f"SOUR:{function}:LEV:IMM:AMPL"):
                if c.query:
                    return f"{self.level[function]:+.6E}"
                value = scpi.number(c)
                if abs(value) > bound:
                    raise ScpiError(*scpi.DATA_OUT_OF_RANGE)
                self.level[function] = value
                self._apply()
                return None
            if h in (f"SENS:{function}:PROT", f"SENS:{function}:PROT:LEV"):
                if c.query:
                    return f"{self.protection[function]:+.6E}"
                value = scpi.number(c)
                if not 0 <= value <= bound:
                    raise ScpiError(*scpi.DATA_OUT_OF_RANGE)
                self.protection[function] = value
                self._apply()
                return None
        if h == "SENS:REM":
            if c.query:
                return "1" if self.remote_sense else "0"
            self.remote_sense = scpi.boolean(c)
            return None
        if h in ("SENS:FUNC", "SENS:FUNC:ON"):
            for parameter in c.parameters:
                if parameter.strip("\"'").upper() not in ("VOLT", "CURR", "VOLTAGE", "CURRENT", "RES"):
                    raise ScpiError(*scpi.ILLEGAL_PARAMETER)
            return None
        if h == "FORM:ELEM:SENS":
            if [p.upper() for p in c.parameters] != ["VOLT", "CURR"]:
                raise ScpiError(*scpi.ILLEGAL_PARAMETER)  # the emulator answers V,I only, and says so
            return None
        if h in ("OUTP", "OUTP:STAT"):
            if c.query:
                return "1" if self.output else "0"
            self.output = scpi.boolean(c)
            self._apply()
            return None
        if h == "OUTP:OFF:MODE":
            if c.query:
                return self.off_mode
            self.off_mode = scpi.choice(c, OFF_MODES)
            self._apply()
            return None
        if h == "MEAS" and c.query:
            if c.parameters and c.parameters[0].replace(" ", "") != "(@1)":
                raise ScpiError(*scpi.ILLEGAL_PARAMETER)  # a B2901A has one channel
            r = self.potentiostat.read()
            voltage, current = (
                (r.voltage_V, r.current_A) if (self.output or self.off_mode != "HIZ") else (9.91e37, 9.91e37)
            )
            self.answered_reads.append((voltage, current))
            return f"{voltage:+.9E},{current:+.9E}"
        raise ScpiError(*scpi.UNDEFINED_HEADER)
