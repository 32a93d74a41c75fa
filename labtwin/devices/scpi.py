"""The SCPI grammar an emulator needs: program messages, headers in short or long form, parameters.

IEEE 488.2 / SCPI-99 rules kept here: a line holds one or more commands
separated by ``;``; a command that does not start with ``:`` or ``*`` after a
``;`` continues in the previous command's subsystem; each header node is
accepted in its short form (the upper-case part of the manual's mnemonic,
``SOUR``) or its complete long form (``SOURCE``), any case, and nothing in
between; ``?`` ends a query. Emulators map normalised headers
(``SOUR:CURR:VLIM``) to handlers, so the table reads like the manual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# long form -> short form, for every node the emulators know
MNEMONICS = {
    "SOURCE": "SOUR",
    "FUNCTION": "FUNC",
    "CURRENT": "CURR",
    "VOLTAGE": "VOLT",
    "LEVEL": "LEV",
    "IMMEDIATE": "IMM",
    "AMPLITUDE": "AMPL",
    "VLIMIT": "VLIM",
    "ILIMIT": "ILIM",
    "READ": "READ",
    "BACK": "BACK",
    "SENSE": "SENS",
    "RSENSE": "RSEN",
    "OUTPUT": "OUTP",
    "STATE": "STAT",
    "SMODE": "SMOD",
    "MEASURE": "MEAS",
    "SYSTEM": "SYST",
    "ERROR": "ERR",
    "NEXT": "NEXT",
    "COUNT": "COUN",
    "RANGE": "RANG",
    "AUTO": "AUTO",
    "NPLCYCLES": "NPLC",
    "MODE": "MODE",
    "OFF": "OFF",
    "PROTECTION": "PROT",
    "REMOTE": "REM",
    "FORMAT": "FORM",
    "ELEMENTS": "ELEM",
    "ON": "ON",
    "ALL": "ALL",
}
SHORT_FORMS = set(MNEMONICS.values())


class ScpiError(Exception):
    """An error the instrument would put in its queue: code and message as the manual lists them."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f'{code},"{message}"')
        self.code = code
        self.message = message


UNDEFINED_HEADER = (-113, "Undefined header")
ILLEGAL_PARAMETER = (-224, "Illegal parameter value")
DATA_OUT_OF_RANGE = (-222, "Data out of range")
MISSING_PARAMETER = (-109, "Missing parameter")
SYNTAX_ERROR = (-102, "Syntax error")


@dataclass(frozen=True)
class Command:
    header: str  # normalised: "SOUR:CURR:VLIM" or "*RST"
    query: bool
    parameters: tuple[str, ...]


def _node(text: str) -> str:
    """Short form of one header node; a numeric suffix (a channel: ``SOUR2``) is kept, except 1, the default
    (``OUTP1`` == ``OUTP``)."""
    match = re.fullmatch(r"([A-Z]+?)(\d*)", text.upper())
    if not match:
        raise ScpiError(*UNDEFINED_HEADER)
    word, suffix = match.groups()
    if word in MNEMONICS:
        word = MNEMONICS[word]
    elif word not in SHORT_FORMS:
        raise ScpiError(*UNDEFINED_HEADER)
    return word + ("" if suffix in ("", "1") else suffix)


def _split(text: str, separator: str) -> list[str]:
    """Split at a separator outside quoted strings (``"VOLT","CURR"`` is two parameters, ``"a;b"`` one)."""
    parts, current, quoted = [], "", None
    for ch in text:
        if quoted:
            current += ch
            if ch == quoted:
                quoted = None
        elif ch in "\"'":
            quoted = ch
            current += ch
        elif ch == separator:
            parts.append(current)
            current = ""
        else:
            current += ch
    if quoted:
        raise ScpiError(*SYNTAX_ERROR)
    parts.append(current)
    return parts


def _split_parameters(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in _split(text, ",") if part.strip())


def parse_line(line: str) -> list[Command]:
    """One program message into commands; raises ScpiError on the first malformed one."""
    commands: list[Command] = []
    path: list[str] = []
    for raw in _split(line, ";"):
        raw = raw.strip()
        if not raw:
            continue
        head, _, rest = raw.partition(" ")
        query = head.endswith("?")
        head = head.rstrip("?")
        if head.startswith("*"):
            commands.append(Command(head.upper(), query, _split_parameters(rest)))
            continue
        absolute = head.startswith(":")
        nodes = [_node(n) for n in head.strip(":").split(":") if n] if head.strip(":") else []
        if not nodes:
            raise ScpiError(*SYNTAX_ERROR)
        full = nodes if absolute or not path else path + nodes
        path = full[:-1]
        commands.append(Command(":".join(full), query, _split_parameters(rest)))
    return commands


def number(command: Command, index: int = 0) -> float:
    if len(command.parameters) <= index:
        raise ScpiError(*MISSING_PARAMETER)
    text = command.parameters[index].upper()
    special = {"MIN": float("-inf"), "MAX": float("inf"), "DEF": float("nan")}
    if text in special:
        raise ScpiError(*ILLEGAL_PARAMETER)  # the emulator does not model MIN/MAX/DEF: say so rather than guess
    try:
        return float(text)
    except ValueError:
        raise ScpiError(*ILLEGAL_PARAMETER) from None


def boolean(command: Command) -> bool:
    if not command.parameters:
        raise ScpiError(*MISSING_PARAMETER)
    text = command.parameters[0].upper()
    if text in {"ON", "1"}:
        return True
    if text in {"OFF", "0"}:
        return False
    raise ScpiError(*ILLEGAL_PARAMETER)


def choice(command: Command, options: dict[str, str]) -> str:
    """A character-data parameter given in short or long form (``CURR``/``CURRENT``), quoted or not."""
    if not command.parameters:
        raise ScpiError(*MISSING_PARAMETER)
    text = command.parameters[0].strip("\"'").upper()
    for long_form, short in options.items():
        if text in (long_form, short):
            return short
    raise ScpiError(*ILLEGAL_PARAMETER)
