"""PalmSens EmStat (EmStat4, EmStat Pico) over MethodSCRIPT: a device-run potentiostat on a serial port.

The EmStat runs whole techniques itself. For each step the driver writes a
MethodSCRIPT (``e``, the script, an empty line), then turns the data packages
it streams into readings; the agent checks every reading against the limits
and end conditions and aborts (``Z``) when one is met. Techniques and their
measurement loops (MethodSCRIPT manual v1.8):

- rest: ``meas_loop_ocp p <interval> <run_time>`` (open-circuit potential)
- cv (constant voltage): ``meas_loop_ca p c <E> <interval> <run_time>``
- cc (constant current): ``meas_loop_cp p c <I> <interval> <run_time>`` in
  pgstat mode 6 with an applied-current range, as PalmSens' CP example does;
  galvanostatic mode is EmStat4/Nexus only, not the Pico
- cyclic voltammetry: ``meas_loop_cv p c <E_begin> <E_vtx1> <E_vtx2> <E_step> <rate> [nscans(n)]``
- EIS (potentiostatic, at the open-circuit potential): ``meas_loop_ocp`` for
  one point, then ``meas_loop_eis f zr zi <amplitude> <f_start> <f_end> <points> <E_dc>``

Every script puts ``cell_off`` under ``on_finished:`` so the cell is
disconnected however the script ends, an abort included. Time comes from the
device (``timer_start`` / ``timer_get``), so the step's clock is the
instrument's. GITT and CCCV are not techniques here; a step the device
cannot run raises with the reason rather than being faked on the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NoReturn

from labtwin.devices.methodscript import ERROR, MethodScriptFormatError, decode_packet, is_loop_marker, literal
from labtwin.devices.potentiostat import Reading
from labtwin.documents import EisSettings, StepCommand, StepKind, SweepSettings
from labtwin.instruments.transport import (
    InstrumentError,
    InstrumentGarbled,
    InstrumentTimeout,
    SerialLineTransport,
    check_range,
)

CURRENT_MAX_A = 0.03  # EmStat4 HR's largest range is 30 mA; validators raise beyond
POTENTIAL_MAX_V = 6.0


class EmStat:
    """Implements labtwin.devices.potentiostat.RunsTechniques (and output_off) on a MethodSCRIPT device."""

    model = "emstat"
    TECHNIQUES = (StepKind.rest, StepKind.cv, StepKind.cc, StepKind.cyclic_voltammetry, StepKind.eis)

    def __init__(
        self,
        transport: SerialLineTransport,
        *,
        pgstat_mode: int = 2,
        current_range: str = "100u",
        autorange: tuple[str, str] = ("100n", "5m"),
    ) -> None:
        self.transport = transport
        self.pgstat_mode = pgstat_mode
        self.current_range = current_range
        self.autorange = autorange
        self._running = False
        self.firmware = self.identify()

    # ------------------------------------------------------------------ device commands

    def identify(self) -> str:
        """Firmware version (``t``): two lines, the second ending in ``*``."""
        self.transport.write_line("t")
        first = self.transport.read_line()
        second = self.transport.read_line()
        if not first.startswith("t") or not second.endswith("*"):
            raise InstrumentGarbled(
                f"{self.transport.resource}: not a MethodSCRIPT device (answered {first!r}, {second!r})"
            )
        return f"{first[1:]} {second[:-1]}".strip()

    def _start(self, lines: list[str]) -> None:
        self.transport.write_line("e")
        for line in lines:
            self.transport.write_line(line)
        self.transport.write_line("")
        answer = self.transport.read_line()
        if answer != "e":
            self._raise_if_error(answer)
            raise InstrumentGarbled(f"{self.transport.resource}: script not accepted (answered {answer!r})")
        self._running = True

    def _raise_if_error(self, line: str) -> None:
        match = ERROR.search(line)
        if match:
            try:  # whatever the device still sends for this script, up to its closing empty line
                self._drain(1.0)
            except InstrumentTimeout:
                pass
            self._running = False
            detail = f" ({match.group(2)})" if match.group(2) else ""
            raise InstrumentError(f"{self.transport.resource}: MethodSCRIPT error 0x{match.group(1).upper()}{detail}")

    def _drain(self, timeout_s: float) -> None:
        """Read until the script's closing empty line, so the next script starts in sync."""
        while self._running:
            line = self.transport.read_line(timeout_s)
            if line == "":
                self._running = False

    # ------------------------------------------------------------------ scripts

    def _preamble(self, variables: str) -> list[str]:
        return [
            *(f"var {v}" for v in variables),
            "set_pgstat_chan 0",
            f"set_pgstat_mode {self.pgstat_mode}",
            f"set_range ba {self.current_range}",
            f"set_autoranging ba {self.autorange[0]} {self.autorange[1]}",
        ]

    @staticmethod
    def _packet(*names: str) -> list[str]:
        return ["  timer_get t", "  pck_start", *(f"  pck_add {n}" for n in ("t", *names)), "  pck_end", "endloop"]

    def script(self, cmd: StepCommand) -> list[str]:
        """The MethodSCRIPT for one step (without the ``e`` and the closing empty line)."""
        interval = literal(cmd.sample_interval_s)
        finish = ["on_finished:", "  cell_off"]
        if cmd.step in (StepKind.rest, StepKind.cv, StepKind.cc):
            run_time = literal(round(cmd.time_budget_s(), 3))
        if cmd.step is StepKind.rest:
            return [
                *self._preamble("tp"),
                "timer_start",
                f"meas_loop_ocp p {interval} {run_time}",
                *self._packet("p"),
                *finish,
            ]
        if cmd.step is StepKind.cv:
            e = literal(_check("voltage_V", cmd.voltage_V, POTENTIAL_MAX_V, "V"))
            return [
                *self._preamble("tpc"),
                f"set_e {e}",
                "cell_on",
                "timer_start",
                f"meas_loop_ca p c {e} {interval} {run_time}",
                *self._packet("p", "c"),
                *finish,
            ]
        if cmd.step is StepKind.cc:
            # Galvanostatic, as PalmSens' CP example sets it up: pgstat mode 6, an applied-current range (db)
            # that holds the setpoint, and the potential range (ab) autoranging up to the cell's voltage.
            current = _check("current_A", cmd.current_A, CURRENT_MAX_A, "A")
            i = literal(current)
            applied_range = literal(10.0 ** math.ceil(math.log10(max(abs(current), 1e-9))))
            return [
                "var t",
                "var p",
                "var c",
                "set_pgstat_chan 0",
                "set_pgstat_mode 6",
                "set_range ab 5",
                "set_autoranging ab 100m 5",
                f"set_range db {applied_range}",
                "set_i 0",
                "cell_on",
                "timer_start",
                f"meas_loop_cp p c {i} {interval} {run_time}",
                *self._packet("p", "c"),
                *finish,
            ]
        if cmd.step is StepKind.cyclic_voltammetry:
            s = _sweep(cmd)
            for name in ("start_V", "vertex_1_V", "vertex_2_V"):
                _check(f"sweep.{name}", getattr(s, name), POTENTIAL_MAX_V, "V")
            low, high = min(s.start_V, s.vertex_1_V, s.vertex_2_V), max(s.start_V, s.vertex_1_V, s.vertex_2_V)
            scans = f" nscans({s.cycles})" if s.cycles > 1 else ""
            return [
                *self._preamble("tpc"),
                f"set_range_minmax da {literal(low)} {literal(high)}",
                f"set_e {literal(s.start_V)}",
                "cell_on",
                "timer_start",
                f"meas_loop_cv p c {literal(s.start_V)} {literal(s.vertex_1_V)} {literal(s.vertex_2_V)} "
                f"{literal(s.step_V)} {literal(s.scan_rate_V_s)}{scans}",
                *self._packet("p", "c"),
                *finish,
            ]
        if cmd.step is StepKind.eis:
            settings = _eis(cmd)
            if settings.mode != "potentiostatic":
                raise InstrumentError("galvanostatic EIS (meas_loop_geis) is not implemented for the EmStat driver yet")
            points = len(settings.frequencies_Hz())
            return [
                *self._preamble("tpfrzo"),
                "timer_start",
                "meas_loop_ocp o 100m 1",
                "  pck_start",
                "  pck_add o",
                "  pck_end",
                "endloop",
                "set_e o",
                "cell_on",
                f"meas_loop_eis f r z {literal(settings.amplitude)} {literal(settings.f_start_Hz)} "
                f"{literal(settings.f_end_Hz)} {literal(points, integer=True)} o",
                *self._packet("f", "r", "z"),
                *finish,
            ]
        raise InstrumentError(
            f"the EmStat has no {cmd.step.value} technique here (GITT and CCCV need a host-timed source)"
        )

    # ------------------------------------------------------------------ RunsTechniques protocol

    def supports(self, step: StepKind) -> bool:
        return step in self.TECHNIQUES

    def _line_timeout(self, cmd: StepCommand) -> float:
        """Longest silence that is still a running technique: the gap between two packages, times three."""
        gap = cmd.sample_interval_s
        if cmd.step is StepKind.cyclic_voltammetry:
            sweep = _sweep(cmd)
            gap = sweep.step_V / sweep.scan_rate_V_s
        elif cmd.step is StepKind.eis:
            eis = _eis(cmd)
            gap = max(eis.periods, 3.0) / min(eis.f_start_Hz, eis.f_end_Hz) + 1.0
        return max(self.transport.timeout_s, 3.0 * gap)

    def run_technique(self, command: StepCommand) -> Iterator[Reading]:
        lines = self.script(command)
        timeout = self._line_timeout(command)
        self._start(lines)
        ocv = math.nan
        try:
            while True:
                line = self.transport.read_line(timeout)
                if line == "":
                    self._running = False
                    return
                if line == "Z" or is_loop_marker(line):
                    continue
                self._raise_if_error(line)
                try:
                    values = {v.var_type: v.value for v in decode_packet(line)}
                except MethodScriptFormatError as exc:
                    raise InstrumentGarbled(f"{self.transport.resource}: {exc}") from None
                t = values.get("eb")
                if "dc" in values:  # an impedance point, measured at the open-circuit potential
                    yield Reading(
                        voltage_V=ocv,
                        current_A=0.0,
                        time_s=t,
                        frequency_Hz=values["dc"],
                        z_real_ohm=values.get("cc"),
                        z_imag_ohm=values.get("cd"),
                    )
                elif command.step is StepKind.eis:
                    ocv = values.get("ab", values.get("da", math.nan))
                else:
                    voltage = values.get("da", values.get("ab"))
                    if voltage is None or t is None:
                        raise InstrumentGarbled(
                            f"{self.transport.resource}: package {line[:60]!r} lacks potential or time"
                        )
                    yield Reading(voltage_V=voltage, current_A=values.get("ba", values.get("db", 0.0)), time_s=t)
        finally:
            if self._running:  # stopped early (end condition, abort, error): bring the device back in sync
                try:
                    self.abort()
                except InstrumentError:
                    pass

    def abort(self) -> None:
        """``Z`` stops the running script; its on_finished (cell_off) runs; wait for the closing empty line."""
        if not self._running:
            return
        self.transport.write_line("Z")
        # The script may end on its own while Z travels: then its closing empty line comes first and the
        # device answers Z!0006 (nothing running) after it. Read until both the Z answer and the end.
        timeout = max(self.transport.timeout_s, 2.0)
        answered = ended = False
        try:
            while not (answered and ended):
                line = self.transport.read_line(timeout)
                if line.startswith("Z"):
                    answered = True
                    ended = ended or line != "Z"  # Z!0006: the end came before it
                elif line == "":
                    ended = True
        finally:
            self._running = False

    # ------------------------------------------------------------------ Potentiostat protocol (safe state only)

    def output_off(self) -> None:
        """Cell off, confirmed: abort whatever runs, then a one-line script that turns the cell off."""
        self.abort()
        self._start(["cell_off"])
        self._drain(self.transport.timeout_s)

    def _host_timed(self, what: str) -> NoReturn:
        raise InstrumentError(
            f"{self.transport.resource}: the EmStat runs techniques on the device; {what} as a host-timed "
            "step needs a source-measure instrument (driver keithley2450)"
        )

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        self._host_timed("a current setting (GITT, CCCV)")

    def set_voltage(self, voltage_V: float, current_limit_A: float) -> None:
        self._host_timed("a voltage setting")

    def open_circuit(self) -> None:
        """Between techniques the cell is already off (every script ends with cell_off): nothing to do."""

    def read(self) -> Reading:
        self._host_timed("a single reading")

    def close(self) -> None:
        try:
            self.output_off()
        finally:
            self.transport.close()


def _sweep(cmd: StepCommand) -> SweepSettings:
    """A CV step's sweep (the step model requires one; a hand-made command may still lack it)."""
    if cmd.sweep is None:
        raise InstrumentError(f"step {cmd.step_index}: a cyclic voltammetry step needs its sweep settings")
    return cmd.sweep


def _eis(cmd: StepCommand) -> EisSettings:
    """An EIS step's settings (the step model requires them; a hand-made command may still lack them)."""
    if cmd.eis is None:
        raise InstrumentError(f"step {cmd.step_index}: an EIS step needs its frequency settings")
    return cmd.eis


def _check(name: str, value: float | None, bound: float, unit: str) -> float:
    return check_range("EmStat", name, value, -bound, bound, unit)
