"""A Keithley 2450 at the wire: an SCPI server on TCP, backed by a simulated cell.

It answers the native 2450 commands labtwin's driver uses (and their long
forms), keeps the instrument's state the way the manual describes it (per
function source level and limit, sense function, remote sense, source
readback, output and output-off state) and an error queue for anything it
does not accept, so the real driver, over pyvisa-py
(``TCPIP::127.0.0.1::<port>::SOCKET`` or ``ASRLsocket://127.0.0.1:<port>::INSTR``),
is what the tests run. Behind it is labtwin's ``SimulatedPotentiostat`` on a
``ScaledWallClock``: the cell lives on the wall clock, ``speed`` times faster.

What the emulator does as the instrument does (and tests rely on):
- output off in the factory NORMal state is a 0 V source with a small current
  limit: a cell left on it discharges. HIMP opens the relay.
- a current source limits |V| at VLIM; a voltage source limits |I| at ILIM.
- a bad header or value goes to the error queue (-113, -224, -222), the
  command is ignored, and ``:SYST:ERR?`` returns the oldest error.

Faults for tests (``fault``): ``"silent"`` reads commands and never answers,
``"garbage"`` answers every query with noise, ``"close"`` drops the
connection at the next command. ``fault_after_queries`` arms it after N
more queries, so a fault can strike mid-step.
"""

from __future__ import annotations

import logging

import numpy as np

from labtwin.devices import scpi
from labtwin.devices.clock import ScaledWallClock
from labtwin.devices.scpi import Command, ScpiError
from labtwin.physics.library import CellDefinition
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.simulators.scpi_server import ScpiInstrument

log = logging.getLogger(__name__)

IDN = "KEITHLEY INSTRUMENTS,MODEL 2450,LABTWIN-EMULATOR,1.7.12b"
CURRENT_RANGE_A = 1.05
VOLTAGE_RANGE_V = 210.0
NORMAL_OFF_CURRENT_LIMIT_A = 0.005 * 0.1  # NORMal off state: 0 V, limit 0.5 % of the (here 100 mA) range
FUNCTIONS = {"CURRENT": "CURR", "VOLTAGE": "VOLT"}
OFF_STATES = {"HIMPEDANCE": "HIMP", "NORMAL": "NORM", "ZERO": "ZERO", "GUARD": "GUAR"}


class Keithley2450Emulator(ScpiInstrument):
    """The instrument's state machine; ``handle(line)`` is one program message in, the answer out."""

    def __init__(self, cell: CellDefinition, *, speed: float = 1.0, seed: int | None = None) -> None:
        self.cell = cell
        self.clock = ScaledWallClock(speed)
        self.potentiostat = SimulatedPotentiostat(cell, self.clock, np.random.default_rng(seed))
        super().__init__()
        self.reset()
        # Power-on state: the setup a battery lab saves on its 2450s (output off = relay open), not the
        # *RST default; with NORMal the cell would drain into the 0 V source before a driver connects.
        self.off_state = {"CURR": "HIMP", "VOLT": "HIMP"}
        self._apply()

    def reset(self) -> None:
        """*RST: the manual's default state (current levels 0, VLIM 21 V, ILIM 105 uA, output off NORMal)."""
        self.source_function = "VOLT"
        self.level = {"CURR": 0.0, "VOLT": 0.0}
        self.voltage_limit_V = 21.0
        self.current_limit_A = 105e-6
        self.sense_function = "CURR"
        self.remote_sense = {"VOLT": False, "CURR": False}
        self.readback = {"CURR": True, "VOLT": True}
        self.output = False
        self.off_state = {"CURR": "NORM", "VOLT": "NORM"}
        self.errors.clear()
        self._apply()

    # ------------------------------------------------------------------ the cell behind the terminals

    def _apply(self) -> None:
        p = self.potentiostat
        if not self.output:
            if self.off_state[self.source_function] == "HIMP":
                p.output_off()
            else:  # NORMal / ZERO: a 0 V source stays across the terminals
                p.set_voltage(0.0, NORMAL_OFF_CURRENT_LIMIT_A)
        elif self.source_function == "CURR":
            level = self.level["CURR"]
            p.set_current(level, self.voltage_limit_V if level >= 0 else -self.voltage_limit_V)
        else:
            p.set_voltage(self.level["VOLT"], self.current_limit_A)

    def _measure(self) -> tuple[float, float]:
        """(reading, source value) as :READ? with READ, SOUR returns them."""
        r = self.potentiostat.read()
        if self.source_function == "CURR":
            source = r.current_A if self.readback["CURR"] else self.level["CURR"]
            measured = r.voltage_V if self.sense_function == "VOLT" else r.current_A
        else:
            source = r.voltage_V if self.readback["VOLT"] else self.level["VOLT"]
            measured = r.current_A if self.sense_function == "CURR" else r.voltage_V
        if not self.output and self.off_state[self.source_function] == "HIMP":
            measured = 9.9e37 if self.sense_function == "VOLT" else 0.0  # relay open: nothing to measure
        return measured, source

    # ------------------------------------------------------------------ program messages

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
        if h == "*OPC" and c.query:
            return "1"
        if h in ("SYST:ERR", "SYST:ERR:NEXT") and c.query:
            code, message = self.next_error()
            return f'{code},"{message}"'
        if h == "SYST:ERR:COUN" and c.query:
            return str(len(self.errors))
        if h == "SOUR:FUNC":
            if c.query:
                return self.source_function
            function = scpi.choice(c, FUNCTIONS)
            if function != self.source_function:
                self.source_function = function
                self.output = False  # the 2450 turns the output off when the source function changes
                self._apply()
            return None
        for function in ("CURR", "VOLT"):
            if h in (f"SOUR:{function}", f"SOUR:{function}:LEV", f"SOUR:{function}:LEV:IMM:AMPL"):
                if c.query:
                    return f"{self.level[function]:.6e}"
                value = scpi.number(c)
                bound = CURRENT_RANGE_A if function == "CURR" else VOLTAGE_RANGE_V
                if abs(value) > bound:
                    raise ScpiError(*scpi.DATA_OUT_OF_RANGE)
                self.level[function] = value
                self._apply()
                return None
            if h == f"SOUR:{function}:READ:BACK":
                if c.query:
                    return "1" if self.readback[function] else "0"
                self.readback[function] = scpi.boolean(c)
                return None
            if h == f"SENS:{function}:RSEN":
                if c.query:
                    return "1" if self.remote_sense[function] else "0"
                self.remote_sense[function] = scpi.boolean(c)
                return None
            if h == f"OUTP:{function}:SMOD":
                if c.query:
                    return self.off_state[function]
                self.off_state[function] = scpi.choice(c, OFF_STATES)
                self._apply()
                return None
        if h == "SOUR:CURR:VLIM":
            if c.query:
                return f"{self.voltage_limit_V:.6e}"
            value = scpi.number(c)
            if not 0.02 <= value <= VOLTAGE_RANGE_V:
                raise ScpiError(*scpi.DATA_OUT_OF_RANGE)
            self.voltage_limit_V = value
            self._apply()
            return None
        if h == "SOUR:VOLT:ILIM":
            if c.query:
                return f"{self.current_limit_A:.6e}"
            value = scpi.number(c)
            if not 1e-9 <= value <= CURRENT_RANGE_A:
                raise ScpiError(*scpi.DATA_OUT_OF_RANGE)
            self.current_limit_A = value
            self._apply()
            return None
        if h == "SENS:FUNC":
            if c.query:
                return f'"{self.sense_function}:DC"'
            self.sense_function = scpi.choice(c, FUNCTIONS)
            return None
        if h in ("OUTP", "OUTP:STAT"):
            if c.query:
                return "1" if self.output else "0"
            self.output = scpi.boolean(c)
            self._apply()
            return None
        if h == "READ" and c.query:
            return self._read(c.parameters)
        if h in ("MEAS:VOLT", "MEAS:CURR") and c.query:
            self.sense_function = h.split(":")[1]
            return f"{self._measure()[0]:.9e}"
        raise ScpiError(*scpi.UNDEFINED_HEADER)

    def _read(self, parameters: tuple[str, ...]) -> str:
        if parameters and parameters[0].strip("\"'") != "defbuffer1" and parameters[0].strip("\"'") != "defbuffer2":
            raise ScpiError(*scpi.ILLEGAL_PARAMETER)
        elements = [p.upper() for p in parameters[1:]] or ["READ"]
        measured, source = self._measure()
        self.answered_reads.append((measured, source))
        out = []
        for element in elements:
            if element in ("READ", "READING"):
                out.append(f"{measured:.9e}")
            elif element in ("SOUR", "SOURCE"):
                out.append(f"{source:.9e}")
            elif element in ("REL", "RELATIVE"):
                out.append(f"{self.clock.now() / self.clock.speed:.6f}")
            else:
                raise ScpiError(*scpi.ILLEGAL_PARAMETER)
        return ",".join(out)
