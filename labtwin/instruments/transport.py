"""How drivers talk to instruments: a line-oriented transport that logs every exchange.

A driver never touches pyvisa or pyserial itself; it writes commands and
queries through a ``Transport``. That keeps drivers thin (they read like the
programming manual) and gives three things for free:

- an audit trail: every command sent to a cell and every answer, with a
  timestamp, in the ``labtwin.instruments.audit`` logger and, when asked, a
  JSON-lines file per channel (what was done to a cell is lab record);
- one error vocabulary: a timeout, a lost connection or an unreadable answer
  becomes an ``InstrumentError`` subclass that names the resource and the
  command, whatever library raised underneath;
- transcript tests: ``labtwin.instruments.transcript.ScriptedTransport`` replays
  expected command/answer pairs through the very same driver code.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

from labtwin.security.redact import redact

if TYPE_CHECKING:
    from pyvisa.resources import MessageBasedResource

audit_log = logging.getLogger("labtwin.instruments.audit")


class InstrumentError(RuntimeError):
    """The instrument did something the driver cannot accept (its error queue, a refused setting)."""


class InstrumentTimeout(InstrumentError, TimeoutError):
    """No answer within the transport's timeout: the instrument stopped answering."""


class InstrumentConnectionLost(InstrumentError, ConnectionError):
    """The link is gone (socket closed, cable pulled, device reset)."""


class InstrumentGarbled(InstrumentError):
    """An answer came back that cannot be what the command asks for."""


@runtime_checkable
class Transport(Protocol):
    resource: str

    def write(self, command: str) -> None: ...

    def query(self, command: str) -> str: ...

    def close(self) -> None: ...


def check_scpi_errors(transport: Transport, instrument: str, context: str) -> None:
    """Drain an SCPI error queue (``:SYST:ERR?`` until code 0); raise with every error it held.

    Both ``0,"No error"`` (Keithley) and ``+0,"No error"`` (Keysight) end it; an answer that does
    not start with an integer code is garbled."""
    errors = []
    for _ in range(32):
        answer = transport.query(":SYST:ERR?")
        code_text, _, message = answer.partition(",")
        try:
            code = int(code_text)
        except ValueError:
            raise InstrumentGarbled(f"{transport.resource}: :SYST:ERR? answered {answer!r}") from None
        if code == 0:
            break
        errors.append(f"{code} {message.strip()}")
    if errors:
        raise InstrumentError(f"{transport.resource}: the {instrument} reported after {context}: {'; '.join(errors)}")


def check_range(instrument: str, name: str, value: float | None, low: float, high: float, unit: str) -> float:
    """A setting inside the instrument's range, or ValueError naming the field and the range: never clipped
    (a silently clipped current is a different experiment)."""
    if value is None or not math.isfinite(value) or not low <= value <= high:
        shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
        raise ValueError(f"{name} = {shown} {unit} is outside the {instrument}'s range [{low:g}, {high:g}] {unit}")
    return float(value)


def scpi_output_off(transport: Transport, suffix: str = "") -> None:
    """``:OUTP OFF`` confirmed by reading the state back: the safe state is a fact, not a hope."""
    transport.write(f":OUTP{suffix} OFF")
    state = transport.query(f":OUTP{suffix}?")
    if state.strip() not in ("0", "OFF"):
        raise InstrumentError(
            f"{transport.resource}: output still on after :OUTP{suffix} OFF (:OUTP{suffix}? answered {state!r})"
        )


@functools.lru_cache(maxsize=64)
def _shown(resource: str) -> str:
    """The resource as an audit line or log shows it: a password in it replaced by *** (once per resource)."""
    return redact(resource)


class AuditTrail:
    """Appends one JSON line per exchange (``>`` sent, ``<`` received) to a file, and logs it."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, resource: str, direction: str, text: str) -> None:
        resource = _shown(resource)  # a resource may be a URL with a password (rfc2217://user:pw@host)
        audit_log.debug("%s %s %s", resource, direction, text)
        if self.path is None:
            return
        line = json.dumps({"t": time.time(), "resource": resource, "dir": direction, "text": text})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")


class VisaTransport:
    """SCPI over pyvisa (pyvisa-py by default: no vendor VISA needed for LAN sockets, USB-TMC, serial).

    ``resource`` is any VISA address: ``TCPIP::192.168.1.20::5025::SOCKET`` (raw
    socket), ``TCPIP::192.168.1.20::INSTR`` (VXI-11), ``USB0::0x05E6::0x2450::...::INSTR``,
    ``GPIB0::18::INSTR``, or ``ASRLsocket://host:port::INSTR`` (pyserial's URL
    handlers through pyvisa-py's serial session: how the tests reach an
    emulator over the serial code path).
    """

    def __init__(
        self,
        resource: str,
        *,
        timeout_s: float = 5.0,
        audit: AuditTrail | None = None,
        backend: str = "@py",
        termination: str = "\n",
    ) -> None:
        import pyvisa

        self.resource = resource
        self.timeout_s = timeout_s
        self.audit = audit or AuditTrail()
        self._errors = (pyvisa.errors.VisaIOError, OSError)
        self._pyvisa = pyvisa
        try:
            self._rm = pyvisa.ResourceManager(backend)
            # Every address labtwin opens (TCPIP SOCKET, ASRL) is message-based: it reads and writes lines.
            self._inst = cast(
                "MessageBasedResource", self._rm.open_resource(resource, open_timeout=int(timeout_s * 1000))
            )
        except (pyvisa.errors.VisaIOError, OSError, ValueError) as exc:
            raise InstrumentConnectionLost(
                f"{resource}: cannot open ({exc}); is the instrument on and the address right?"
            ) from None
        self._inst.timeout = int(timeout_s * 1000)
        self._inst.read_termination = termination
        self._inst.write_termination = termination

    def _translate(self, exc: Exception, command: str) -> InstrumentError:
        code = getattr(exc, "error_code", None)
        if code == self._pyvisa.constants.StatusCode.error_timeout:
            return InstrumentTimeout(f"{self.resource}: no answer to {command!r} within {self.timeout_s:g} s")
        if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
            return InstrumentConnectionLost(
                f"{self.resource}: connection refused at {command!r}: is the instrument on and the address right?"
            )
        return InstrumentConnectionLost(f"{self.resource}: link lost during {command!r} ({exc})")

    def write(self, command: str) -> None:
        self.audit.record(self.resource, ">", command)
        try:
            self._inst.write(command)
        except self._errors as exc:
            raise self._translate(exc, command) from None

    def query(self, command: str) -> str:
        self.audit.record(self.resource, ">", command)
        try:
            self._inst.write(command)
            answer = self._inst.read()
        except self._errors as exc:
            raise self._translate(exc, command) from None
        except UnicodeDecodeError:
            raise InstrumentGarbled(f"{self.resource}: answer to {command!r} is not text") from None
        self.audit.record(self.resource, "<", answer)
        return answer.strip()

    def close(self) -> None:
        try:
            self._inst.close()
            self._rm.close()
        except Exception:  # closing a dead link must not hide why it died
            pass


class SerialLineTransport:
    """Newline-terminated lines over pyserial: a USB virtual COM port (``/dev/ttyACM0``, ``COM5``) or any
    pyserial URL (``socket://127.0.0.1:4001`` reaches an emulator; ``rfc2217://`` a serial server).

    Streaming instruments (a MethodSCRIPT device sends packets as it measures) need lines, not
    query/answer pairs: ``write_line`` and ``read_line(timeout_s)``, each exchange audited.
    """

    def __init__(
        self, url: str, *, baudrate: int = 230400, timeout_s: float = 5.0, audit: AuditTrail | None = None
    ) -> None:
        import serial

        self.resource = url
        self.timeout_s = timeout_s
        self.audit = audit or AuditTrail()
        self._serial_errors = (serial.SerialException, OSError)
        try:
            self._port = serial.serial_for_url(url, baudrate=baudrate, timeout=0.05)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise InstrumentConnectionLost(
                f"{url}: cannot open ({exc}); is the device plugged in and the port right?"
            ) from None
        self._buffer = bytearray()

    def write_line(self, line: str) -> None:
        self.audit.record(self.resource, ">", line)
        try:
            self._port.write((line + "\n").encode("ascii"))
        except self._serial_errors as exc:
            raise InstrumentConnectionLost(f"{self.resource}: link lost writing {line!r} ({exc})") from None
        except UnicodeEncodeError:
            raise ValueError(f"{line!r}: instruments take ASCII only") from None

    def read_line(self, timeout_s: float | None = None) -> str:
        """One line without its newline; InstrumentTimeout if none completes within the timeout."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                raw, self._buffer = bytes(self._buffer[:end]), self._buffer[end + 1 :]
                try:
                    line = raw.decode("ascii").rstrip("\r")
                except UnicodeDecodeError:
                    raise InstrumentGarbled(f"{self.resource}: non-ASCII bytes in {raw[:40]!r}") from None
                self.audit.record(self.resource, "<", line)
                return line
            if time.monotonic() > deadline:
                raise InstrumentTimeout(f"{self.resource}: no complete line within {timeout_s or self.timeout_s:g} s")
            try:
                # Only what is waiting: pyserial's socket:// handler raises on EOF inside a longer read and
                # the bytes it had already received would be lost with it.
                chunk = self._port.read(self._port.in_waiting or 1)
            except self._serial_errors as exc:
                raise InstrumentConnectionLost(f"{self.resource}: link lost ({exc})") from None
            if chunk:
                self._buffer.extend(chunk)

    def close(self) -> None:
        try:
            self._port.close()
        except Exception:
            pass
