"""The options every command shares, declared once so each says the same precedence in its help.

Also the progress option and its mode (``labtwin.cli.progress`` re-exports them): every command module
imports this one, and only the few commands that follow a run need the rest of the progress view (rich's
progress bars, the bus documents).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import typer

if TYPE_CHECKING:
    from rich.console import Console

BrokerOpt = typer.Option(
    None, "--broker", help="mqtt://host:port or mqtts://host:8883 (default: LABTWIN_BROKER, the lab file's broker:)"
)
LabOpt = typer.Option(None, "--lab", help="lab file (default: LABTWIN_LAB, else the packaged demo lab)")
StoreOpt = typer.Option(
    None,
    "--store",
    help="SQLite path or postgresql:// URL (default: LABTWIN_STORE, the lab file's store:, ./labtwin-data/labtwin.db)",
)
SpeedOpt = typer.Option(
    None, "--speed", help="simulated channels: 1 = real time, 1000, or max (default: LABTWIN_SPEED, the channel's)"
)
JsonOpt = typer.Option(False, "--json", help="print results as JSON")

Mode = Literal["live", "lines", "off"]

ProgressOpt = typer.Option(
    None,
    "--progress/--no-progress",
    help="progress on stderr (steps, cycle, cell time, ETA); default: on when stderr is a terminal and "
    "--json is not given; --progress forces it (one line per step off a terminal)",
)


def progress_mode(flag: bool | None, as_json: bool, console: Console) -> Mode:
    """How to show progress: the flag when given, else live bars on a terminal without --json."""
    if flag is False or (flag is None and (as_json or not console.is_terminal)):
        return "off"
    return "live" if console.is_terminal else "lines"
