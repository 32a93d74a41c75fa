"""A PalmSens EmStat at the wire: a MethodSCRIPT device on a TCP port, reached through pyserial's
``socket://127.0.0.1:<port>`` URL, with labtwin's simulated cell on the electrodes.

It does what the device does with a script: acknowledges ``e``, reads the
script to its empty line, checks every line (an unknown command or a bad
literal is an ``!XXXX: Line n, Col 1`` error and nothing runs), then runs it:
declared variables, ``set_e``/``set_i``/``cell_on``/``cell_off``,
``timer_start``/``timer_get``, and the measurement loops ``meas_loop_ocp``,
``meas_loop_ca``, ``meas_loop_cp``, ``meas_loop_cv`` and ``meas_loop_eis``,
streaming ``M0000``, one ``P...`` data package per loop pass, ``*``, and the
closing empty line. ``Z`` aborts a running script (``Z``, then on_finished,
then the empty line); with nothing running it answers ``Z!0006`` as the
published examples show. ``t`` gives a two-line firmware version.

The cell lives on the wall clock times ``speed``. Faults for tests as on the
2450 emulator: ``silent``, ``garbage``, ``close`` after ``fault_after_packets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np

from labtwin.devices.clock import ScaledWallClock
from labtwin.devices.methodscript import MethodScriptFormatError, encode_variable, parse_literal
from labtwin.documents import SweepSettings
from labtwin.physics.library import CellDefinition
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.simulators.scpi_server import ScpiEmulatorThread

FIRMWARE = ("tes4_lr1.3", "#labtwin MethodSCRIPT emulator*")
SETTINGS = {
    "set_pgstat_chan",
    "set_pgstat_mode",
    "set_max_bandwidth",
    "set_range",
    "set_autoranging",
    "set_range_minmax",
    "set_acquisition_frac_autoadjust",
    "set_gpio_cfg",
    "set_gpio",
}
LOOPS = {"meas_loop_ocp": 3, "meas_loop_ca": 5, "meas_loop_cp": 5, "meas_loop_cv": 7, "meas_loop_eis": 8}
BODY = {"pck_start", "pck_add", "pck_end", "timer_get"}
COMPLIANCE_V = 10.0  # the galvanostat's potential range
CURRENT_LIMIT_A = 0.03


class ScriptError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(
            f"!4004: Line {line}, Col 1"
        )  # code 0x4004 chosen here: the manual's code table was not at hand
        self.detail = message


class EmStatEmulator:
    def __init__(self, cell: CellDefinition, *, speed: float = 1.0, seed: int | None = None) -> None:
        self.cell = cell
        self.clock = ScaledWallClock(speed)
        self.rng = np.random.default_rng(seed)
        self.potentiostat = SimulatedPotentiostat(cell, self.clock, self.rng)
        self.potentiostat.output_off()
        self.fault: str | None = None
        self.fault_after_packets: int | None = None
        self.scripts: list[list[str]] = []
        self.packets_sent: list[str] = []
        self.loops: list[tuple[str, list[str]]] = []  # (measurement loop, the packages it produced)
        self.cell_on = False
        self._abort = threading.Event()

    # ------------------------------------------------------------------ checking a script

    def check(self, lines: list[str]) -> list[tuple[int, list[str]]]:
        """Tokenised commands with their line numbers; raises ScriptError at the first bad line."""
        commands, depth, declared = [], 0, set()
        for number, raw in enumerate(lines, start=1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            tokens = text.split()
            word = tokens[0]
            if word == "var":
                if len(tokens) != 2:
                    raise ScriptError(number, "var takes one name")
                declared.add(tokens[1])
            elif word in LOOPS:
                names = tokens[1:]
                if len(names) < LOOPS[word] or (word == "meas_loop_cv" and len(names) > 8):
                    raise ScriptError(number, f"{word} takes {LOOPS[word]} arguments")
                depth += 1
            elif word == "endloop":
                depth -= 1
                if depth < 0:
                    raise ScriptError(number, "endloop without a loop")
            elif word in ("pck_add", "timer_get"):
                if len(tokens) != 2 or tokens[1] not in declared:
                    raise ScriptError(number, f"{word} needs a declared variable")
            elif word not in SETTINGS | BODY | {
                "cell_on",
                "cell_off",
                "set_e",
                "set_i",
                "timer_start",
                "on_finished:",
                "store_var",
            }:
                raise ScriptError(number, f"unknown command {word!r}")
            for token in tokens[1:]:
                if token in declared or token.startswith("nscans(") or word in SETTINGS | {"store_var"}:
                    continue
                try:
                    parse_literal(token)
                except MethodScriptFormatError:
                    if word not in ("var", "pck_add", "timer_get") and not (word in LOOPS and token == tokens[1]):
                        raise ScriptError(number, f"bad argument {token!r}") from None
            commands.append((number, tokens))
        if depth != 0:
            raise ScriptError(len(lines), "loop not closed")
        return commands

    # ------------------------------------------------------------------ running a script

    def run(self, commands: list[tuple[int, list[str]]], emit) -> None:
        """Execute checked commands, calling emit(line) for every output line (the closing one included)."""
        self._abort.clear()
        values: dict[str, float] = {}
        on_finished: list[tuple[int, list[str]]] = []
        if any(tokens[0] == "on_finished:" for _, tokens in commands):
            split = next(i for i, (_, tokens) in enumerate(commands) if tokens[0] == "on_finished:")
            commands, on_finished = commands[:split], commands[split + 1 :]
        try:
            self._block(commands, values, emit)
        finally:
            self._block(on_finished, values, emit)
            emit("")

    def _value(self, token: str, values: dict[str, float]) -> float:
        return values[token] if token in values else parse_literal(token)

    def _block(self, commands, values, emit) -> None:
        i = 0
        while i < len(commands):
            _, tokens = commands[i]
            word = tokens[0]
            if word in LOOPS:
                end = i + 1
                depth = 1
                while depth:
                    depth += 1 if commands[end][1][0] in LOOPS else -1 if commands[end][1][0] == "endloop" else 0
                    end += 1
                if not self._abort.is_set():
                    self._loop(tokens, commands[i + 1 : end - 1], values, emit)
                i = end
                continue
            if word == "cell_on":
                self.cell_on = True
            elif word == "cell_off":
                self.cell_on = False
                self.potentiostat.output_off()
            elif word == "set_e":
                values["_e"] = self._value(tokens[1], values)
            elif word == "set_i":
                values["_i"] = self._value(tokens[1], values)
            elif word == "timer_start":
                values["_t0"] = self.clock.now()
            elif word == "store_var":
                values[tokens[1]] = parse_literal(tokens[2])
            i += 1

    def _loop(self, tokens: list[str], body, values, emit) -> None:
        word, args = tokens[0], tokens[1:]
        p = self.potentiostat
        emit("M0000")
        produced: list[str] = []
        self.loops.append((word, produced))
        kinds: dict[str, str] = {}
        due = [self.clock.now()]

        def wait(dt: float) -> None:
            """Pace against the loop's start, as the device's timer does: the time spent computing and
            writing a package does not stretch the technique (at 200x it would triple a CV's duration)."""
            due[0] += dt
            self.clock.sleep(max(0.0, due[0] - self.clock.now()))

        def passes():
            if word == "meas_loop_ocp":
                var, interval, run_time = args[0], self._value(args[1], values), self._value(args[2], values)
                kinds[var] = "ab"
                p.open_circuit()
                for _ in range(max(1, int(round(run_time / interval)))):
                    wait(interval)
                    yield {var: p.read().voltage_V}
            elif word in ("meas_loop_ca", "meas_loop_cp"):
                pv, cv, level = args[0], args[1], self._value(args[2], values)
                interval, run_time = self._value(args[3], values), self._value(args[4], values)
                if word == "meas_loop_ca":
                    kinds.update({pv: "da", cv: "ba"})
                    p.set_voltage(level, CURRENT_LIMIT_A)
                else:
                    kinds.update({pv: "ab", cv: "ba"})
                    p.set_current(level, COMPLIANCE_V if level >= 0 else -COMPLIANCE_V)
                for _ in range(max(1, int(round(run_time / interval)))):
                    wait(interval)
                    r = p.read()
                    yield {pv: level if word == "meas_loop_ca" else r.voltage_V, cv: r.current_A}
            elif word == "meas_loop_cv":
                pv, cv = args[0], args[1]
                start, v1, v2, step, rate = (self._value(a, values) for a in args[2:7])
                cycles = int(args[7][len("nscans(") : -1]) if len(args) > 7 else 1
                kinds.update({pv: "da", cv: "ba"})
                sweep = SweepSettings(
                    start_V=start, vertex_1_V=v1, vertex_2_V=v2, scan_rate_V_s=rate, step_V=step, cycles=cycles
                )
                for potential in sweep.potentials_V():
                    p.set_voltage(potential, CURRENT_LIMIT_A)
                    wait(step / rate)
                    yield {pv: potential, cv: p.read().current_A}
            elif word == "meas_loop_eis":
                fv, rv, iv = args[0], args[1], args[2]
                f_start, f_end = self._value(args[4], values), self._value(args[5], values)
                points = int(self._value(args[6], values))
                kinds.update({fv: "dc", rv: "cc", iv: "cd"})
                p.open_circuit()  # E_dc is the open-circuit potential the script measured: no DC current
                for f in np.logspace(np.log10(f_start), np.log10(f_end), points):
                    wait(max(2.0 / f, 0.1))
                    p.read()
                    z = complex(p.model.impedance_ohm(np.array([f]))[0])
                    sigma = self.cell.impedance_noise_relative * abs(z)
                    if sigma:
                        z += complex(self.rng.normal(0, sigma), self.rng.normal(0, sigma))
                    yield {fv: float(f), rv: z.real, iv: z.imag}

        for measured in passes():
            if self._abort.is_set():
                break
            values.update(measured)
            packet: list[str] = []
            for _, body_tokens in body:
                if body_tokens[0] == "timer_get":
                    values[body_tokens[1]] = self.clock.now() - values.get("_t0", 0.0)
                    kinds[body_tokens[1]] = "eb"
                elif body_tokens[0] == "pck_start":
                    packet = []
                elif body_tokens[0] == "pck_add":
                    name = body_tokens[1]
                    packet.append(encode_variable(kinds.get(name, "ja"), values.get(name, float("nan"))))
                elif body_tokens[0] == "pck_end":
                    produced.append("P" + ";".join(packet))
                    emit(produced[-1])
        emit("*")

    def abort(self) -> None:
        self._abort.set()


class EmStatServer:
    """The emulator on TCP; the driver reaches it as pyserial ``socket://host:port``."""

    def __init__(self, emulator: EmStatEmulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self.host, self.port = host, port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> EmStatServer:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        emulator = self.emulator
        self._writers.add(writer)
        running: asyncio.Future | None = None
        script: list[str] | None = None
        closed = threading.Event()

        def emit(line: str) -> None:
            """From the script thread: one output line, through the configured fault."""
            if line.startswith("P"):
                emulator.packets_sent.append(line)
                if emulator.fault_after_packets is not None:
                    emulator.fault_after_packets -= 1
            armed = emulator.fault is not None and (
                emulator.fault_after_packets is None or emulator.fault_after_packets < 0
            )
            if closed.is_set() or (armed and emulator.fault == "silent"):
                return
            if armed and emulator.fault == "close":
                closed.set()
                emulator.abort()
                loop.call_soon_threadsafe(writer.close)
                return
            if armed and emulator.fault == "garbage" and line.startswith("P"):
                line = "P\x7f\x01garbled"
            loop.call_soon_threadsafe(writer.write, (line + "\n").encode("latin-1"))

        try:
            while not closed.is_set():
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\r\n")
                if script is not None:  # collecting a script until its empty line
                    if line:
                        script.append(line)
                        continue
                    lines, script = script, None
                    emulator.scripts.append(lines)
                    try:
                        commands = emulator.check(lines)
                    except ScriptError as exc:
                        writer.write(f"{exc}\n\n".encode())
                        continue
                    running = loop.run_in_executor(None, emulator.run, commands, emit)
                    continue
                if line == "e":
                    if running is not None and not running.done():
                        # The script's last line is out before its thread returns: a driver that starts the next
                        # script at once (as it should) must not find a device that is still finishing.
                        await asyncio.wait([running], timeout=1.0)
                    if running is not None and not running.done():
                        writer.write(b"e!0003\n")  # busy: a script is running
                        continue
                    writer.write(b"e\n")
                    script = []
                elif line == "t":
                    writer.write(f"{FIRMWARE[0]}\n{FIRMWARE[1]}\n".encode())
                elif line == "Z":
                    if running is not None and not running.done():
                        writer.write(b"Z\n")
                        emulator.abort()
                    else:
                        writer.write(b"Z!0006\n")
                elif line:
                    writer.write(b"!0001\n")  # not a command this emulator knows
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            closed.set()
            emulator.abort()
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        assert self._server is not None, "start() first"
        async with self._server:
            await self._server.serve_forever()


def EmStatThread(emulator: EmStatEmulator, port: int = 0) -> ScpiEmulatorThread:
    """The EmStat server in a background thread (the SCPI emulators' thread, with this server)."""
    return ScpiEmulatorThread(emulator, port, server_class=EmStatServer)
