"""MethodSCRIPT, the language PalmSens potentiostats (EmStat Pico, EmStat4, Sensit, Nexus) run.

Two halves, shared by the driver (labtwin/instruments/emstat.py) and the emulator
(labtwin/simulators/emstat.py) so that both speak one dialect; it lives in labtwin.devices
because instruments and simulators must not import each other: writing numbers the way scripts take them, and reading the data
packages a running script streams back. Formats follow PalmSens'
MethodSCRIPT manual v1.8 and their published examples (PalmSens/
MethodSCRIPT_Examples):

- a literal is an integer with an optional SI prefix: ``500m``, ``-1200u``,
  ``100k``, ``11i`` (an integer count); there is no decimal point;
- a data package is a line ``P<var>;<var>;...``; each variable is two letters
  of type (``da`` applied potential, ``ba`` WE current, ``ab`` WE vs RE
  potential, ``eb`` time, ``dc`` frequency, ``cc``/``cd`` Z real/imaginary,
  ...), seven hex digits holding the value plus 2**27, and an SI prefix
  character, optionally followed by ``,metadata`` tokens;
- loops open with ``M<4 hex>`` (measurement loop), ``L`` or ``C<4 hex>``
  (scan) and close with ``*``, ``+`` and ``-``; a script's output ends with
  an empty line; errors read ``!<4 hex>`` with optional ``: Line n, Col m``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

PREFIX_FACTOR = {
    "a": 1e-18,
    "f": 1e-15,
    "p": 1e-12,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    " ": 1.0,
    "i": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
}
OFFSET = 2**27
ERROR = re.compile(r"!([0-9A-Fa-f]{4})(?::\s*(.*))?$")

VARIABLE_TYPES = {
    "ab": "WE vs RE potential",
    "ba": "WE current",
    "cc": "Z real",
    "cd": "Z imaginary",
    "da": "applied potential",
    "db": "applied current",
    "dc": "applied frequency",
    "eb": "time",
    "ja": "generic",
}


class MethodScriptFormatError(ValueError):
    pass


def literal(value: float, integer: bool = False) -> str:
    """A number as a script literal: the coarsest SI prefix that keeps it exact to 1 ppm (``0.0251`` ->
    ``25100u``). Raises rather than round a setting silently."""
    if integer:
        if value != int(value) or value < 0:
            raise MethodScriptFormatError(f"{value} is not a count")
        return f"{int(value)}i"
    if not math.isfinite(value):
        raise MethodScriptFormatError(f"{value} cannot be written in a script")
    if value == 0:
        return "0"
    for prefix in ("G", "M", "k", "", "m", "u", "n", "p", "f"):
        mantissa = value / PREFIX_FACTOR[prefix or " "]
        nearest = round(mantissa)
        if nearest != 0 and abs(mantissa - nearest) <= 1e-6 * abs(mantissa) and abs(nearest) < OFFSET:
            return f"{nearest}{prefix}"
    raise MethodScriptFormatError(f"{value} has no exact MethodSCRIPT literal")


def parse_literal(text: str) -> float:
    """A script literal back to a number (the emulator reads scripts with this)."""
    match = re.fullmatch(r"([+-]?\d+)([afpnumkMGTPEi]?)", text.strip())
    if not match:
        raise MethodScriptFormatError(f"{text!r} is not a MethodSCRIPT number (integer with an optional SI prefix)")
    return int(match.group(1)) * PREFIX_FACTOR[match.group(2) or " "]


def encode_variable(var_type: str, value: float) -> str:
    """One packet variable with the finest prefix that holds the value (the device's own choice)."""
    if math.isnan(value):
        return f"{var_type}     nan"
    for prefix in ("f", "p", "n", "u", "m", " ", "k", "M", "G"):
        mantissa = round(value / PREFIX_FACTOR[prefix])
        if abs(mantissa) < OFFSET - 1:
            return f"{var_type}{mantissa + OFFSET:07X}{prefix}"
    raise MethodScriptFormatError(f"{value} does not fit a data package")


@dataclass(frozen=True)
class PacketVariable:
    var_type: str
    value: float


def decode_variable(text: str) -> PacketVariable:
    body = text.split(",")[0]
    if len(body) != 10 or not body[:2].isalpha():
        raise MethodScriptFormatError(f"{text!r} is not a packet variable (type, 7 hex digits, SI prefix)")
    if body[2:] == "     nan":
        return PacketVariable(body[:2], math.nan)
    try:
        raw = int(body[2:9], 16) - OFFSET
        factor = PREFIX_FACTOR[body[9]]
    except (ValueError, KeyError):
        raise MethodScriptFormatError(f"{text!r} is not a packet variable (type, 7 hex digits, SI prefix)") from None
    return PacketVariable(body[:2], raw * factor)


def decode_packet(line: str) -> list[PacketVariable]:
    if not line.startswith("P") or len(line) < 11:
        raise MethodScriptFormatError(f"{line[:60]!r} is not a data package")
    return [decode_variable(v) for v in line[1:].split(";")]


def is_loop_marker(line: str) -> bool:
    return line in ("*", "+", "-", "L") or bool(re.fullmatch(r"[MC][0-9A-Fa-f]{4}", line))
