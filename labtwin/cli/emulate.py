"""`labtwin emulate MODEL`: a simulated cell behind a real instrument's wire protocol.

Point any tool at it, labtwin's own driver included: the lab file line that
reaches it is printed on start. The emulated cell lives on the wall clock,
``--speed`` times faster; a channel driving it needs the same ``speed``.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

err = Console(stderr=True)
emulate_app = typer.Typer(
    help="Run a wire-level emulator of an instrument with a simulated cell behind it.", no_args_is_help=True
)

CellOpt = typer.Option("lto-thin-film", "--cell", help="simulated cell: a name in labtwin/physics/cells or a YAML path")
PortOpt = typer.Option(5025, "--port", help="TCP port (the 2450's own raw-socket port is 5025)")
HostOpt = typer.Option("127.0.0.1", "--host", help="0.0.0.0 exposes it to the network")
SpeedOpt = typer.Option(1.0, "--speed", help="cell seconds per wall second (1 = real time, as the instrument)")
SeedOpt = typer.Option(None, "--seed", help="noise seed")


def _serve(make_server, banner) -> None:
    """Start a server, print the lines that reach it (plain, never wrapped: they are copied into lab files), serve."""
    import asyncio

    async def serve() -> None:
        server = await make_server().start()
        print(banner(server.port), file=sys.stderr, flush=True)
        await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        err.print(f"[red]cannot listen: {exc}[/red]")
        raise typer.Exit(1) from None


def _positive(speed: float) -> None:
    if not speed > 0:
        raise typer.BadParameter(f"--speed must be positive, got {speed}")


@emulate_app.command("keithley2450")
def keithley2450(
    cell: str = CellOpt, port: int = PortOpt, host: str = HostOpt, speed: float = SpeedOpt, seed: int = SeedOpt
) -> None:
    """A Keithley 2450 SourceMeter (native SCPI over a raw TCP socket)."""
    from labtwin.physics.library import load_cell
    from labtwin.simulators.keithley2450 import Keithley2450Emulator
    from labtwin.simulators.scpi_server import ScpiServer

    _positive(speed)
    definition = load_cell(cell)
    _serve(
        lambda: ScpiServer(Keithley2450Emulator(definition, speed=speed, seed=seed), host, port),
        lambda p: (
            f"Keithley 2450 emulator with cell {definition.name} on {host}:{p} at {speed:g}x real time\n"
            f'  lab file:  driver: keithley2450, resource: "TCPIP::{host}::{p}::SOCKET", speed: {speed:g}\n'
            f'  or serial: resource: "ASRLsocket://{host}:{p}::INSTR"; Ctrl-C stops'
        ),
    )


@emulate_app.command("b2900")
def b2900(
    cell: str = CellOpt, port: int = PortOpt, host: str = HostOpt, speed: float = SpeedOpt, seed: int = SeedOpt
) -> None:
    """A Keysight B2901A SMU (SCPI over a raw TCP socket), the cell on channel 1."""
    from labtwin.physics.library import load_cell
    from labtwin.simulators.b2900 import KeysightB2900Emulator
    from labtwin.simulators.scpi_server import ScpiServer

    _positive(speed)
    definition = load_cell(cell)
    _serve(
        lambda: ScpiServer(KeysightB2900Emulator(definition, speed=speed, seed=seed), host, port),
        lambda p: (
            f"Keysight B2901A emulator with cell {definition.name} on {host}:{p} at {speed:g}x real time\n"
            f'  lab file:  driver: b2900, resource: "TCPIP::{host}::{p}::SOCKET", speed: {speed:g}; Ctrl-C stops'
        ),
    )


@emulate_app.command("emstat")
def emstat(
    cell: str = CellOpt,
    port: int = typer.Option(4001, "--port", help="TCP port; reach it as socket://host:port"),
    host: str = HostOpt,
    speed: float = SpeedOpt,
    seed: int = SeedOpt,
) -> None:
    """A PalmSens EmStat running MethodSCRIPT (reach it with pyserial's socket:// URL)."""
    from labtwin.physics.library import load_cell
    from labtwin.simulators.emstat import EmStatEmulator, EmStatServer

    _positive(speed)
    definition = load_cell(cell)
    _serve(
        lambda: EmStatServer(EmStatEmulator(definition, speed=speed, seed=seed), host, port),
        lambda p: (
            f"EmStat (MethodSCRIPT) emulator with cell {definition.name} on {host}:{p} at {speed:g}x real time\n"
            f'  lab file:  driver: emstat, resource: "socket://{host}:{p}", speed: {speed:g}; Ctrl-C stops'
        ),
    )
