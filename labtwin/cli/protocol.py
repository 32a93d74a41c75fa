"""`labtwin protocol show|check|export` and `labtwin schema protocol`: a protocol looked at before it runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from labtwin.cli.consoles import results_console
from labtwin.cli.options import LabOpt

console = results_console()
err = Console(stderr=True)
protocol_app = typer.Typer(help="Inspect, check and export protocol files without running them.", no_args_is_help=True)
schema_app = typer.Typer(
    help="JSON Schemas of labtwin's files, for editors that validate and autocomplete.", no_args_is_help=True
)


def _fail(message: str) -> None:
    """A protocol refused: one line, exit 1 (`protocol check`'s documented answer for "would not run")."""
    from labtwin.cli.errors import EXIT_RUN_FAILED, UserError

    raise UserError(message, exit_code=EXIT_RUN_FAILED)


def _context(channel: str | None, lab: Path | None, capacity: float | None):
    """Compile context for a channel of the lab file: its limits and its cell's nominal capacity."""
    from labtwin.protocols.compile import CompileContext

    if channel is None:
        return CompileContext("check", capacity, None), None
    from labtwin.cli.wiring import default_lab

    cfg = default_lab(lab).channel(channel)
    nominal = capacity or cfg.nominal_capacity_Ah
    if nominal is None and cfg.cell:
        from labtwin.physics.library import load_cell

        nominal = load_cell(cfg.cell).nominal_capacity_Ah
    return CompileContext("check", nominal, cfg.limits), cfg


def _compile(file: str, channel: str | None, lab: Path | None, capacity: float | None):
    from labtwin.cli.wiring import check_text_file
    from labtwin.protocols.compile import compile_protocol
    from labtwin.protocols.model import ProtocolError, load_protocol, resolve_protocol_path

    try:
        check_text_file(resolve_protocol_path(file), "a protocol")
        protocol = load_protocol(file)
        ctx, cfg = _context(channel, lab, capacity)
        return protocol, compile_protocol(protocol, ctx), cfg
    except (ProtocolError, ValueError) as exc:
        _fail(str(exc))


def _describe(cmd) -> tuple[str, str]:
    from labtwin.documents import StepKind

    setpoint = ""
    if cmd.step in (StepKind.cc, StepKind.gitt):
        setpoint = f"{cmd.current_A:+.4g} A"
    elif cmd.step is StepKind.cp:
        setpoint = f"{cmd.power_W:+.4g} W"
    elif cmd.step is StepKind.cv:
        setpoint = f"{cmd.voltage_V:.4g} V"
    elif cmd.step is StepKind.cccv:
        setpoint = f"{cmd.current_A:+.4g} A, {cmd.voltage_V:.4g} V"
    elif cmd.step is StepKind.cyclic_voltammetry:
        s = cmd.sweep
        setpoint = f"{s.start_V:g}->{s.vertex_1_V:g}->{s.vertex_2_V:g} V @ {s.scan_rate_V_s * 1e3:g} mV/s"
    elif cmd.step is StepKind.eis:
        setpoint = f"{cmd.eis.f_start_Hz:g}-{cmd.eis.f_end_Hz:g} Hz"
    ends = [f"{name} {value:g}" for name, value in cmd.end.model_dump().items() if value is not None]
    return setpoint, ", ".join(ends) or "technique complete"


@protocol_app.command("show")
def show(
    file: str = typer.Argument(..., help="protocol file, or a name in labtwin/protocols/library"),
    channel: str | None = typer.Option(None, "--channel", "-c", help="compile against this channel's limits and cell"),
    lab: Path | None = LabOpt,
    capacity: float | None = typer.Option(None, "--capacity", help="nominal capacity in Ah, for C-rates"),
    as_json: bool = typer.Option(False, "--json", help="the compiled StepCommands as JSON"),
) -> None:
    """The compiled step list: what the agent will be asked to run, in order."""
    from labtwin.protocols.compile import LoopEnd, LoopStart, compile_program

    protocol, commands, _ = _compile(file, channel, lab, capacity)
    if as_json:
        print(json.dumps([c.model_dump(mode="json") for c in commands], indent=1))
        return
    ctx, _ = _context(channel, lab, capacity)
    program = compile_program(protocol, ctx)
    tag_at = {pc: tag for tag, pc in program.tags.items()}
    table = Table(
        title=f"{protocol.metadata.name}: {len(commands)} steps"
        + (" (loops listed once; cycle numbers inside loops are given as they run)" if not program.is_static else "")
    )
    for col in ("#", "repetition", "step", "setpoint", "ends on", "then", "time budget / h", "label"):
        table.add_column(col, overflow="fold")
    depth = 0
    for pc, instr in enumerate(program.instructions):
        tag = f"@{tag_at[pc]} " if pc in tag_at else ""  # (square brackets would be read as rich markup)
        indent = "  " * depth
        if isinstance(instr, LoopStart):
            end = next(i for i in program.instructions if isinstance(i, LoopEnd) and i.loop == instr.loop)
            until = ", ".join(f"{k} {v:g}" for k, v in end.until.model_dump(exclude_none=True).items())
            table.add_row("", "", f"{indent}loop", "", f"{until} (at most {end.max_cycles} cycles)", "", "", tag)
            depth += 1
            continue
        if isinstance(instr, LoopEnd):
            depth -= 1
            table.add_row("", "", f"{'  ' * depth}end loop", "", "", "", "", "")
            continue
        c = instr.command
        setpoint, ends = _describe(c)
        then = ", ".join(
            f"{k}: {v if isinstance(v, str) else 'goto ' + v.goto}" for k, v in instr.then.items() if v != "next"
        )
        table.add_row(
            str(c.step_index),
            "loop" if instr.loops else str(c.repetition),
            indent + c.step.value,
            setpoint,
            ends,
            then,
            f"{c.time_budget_s() / 3600:.3g}",
            tag + c.label,
        )
    console.print(table)
    if program.stop_when is not None:
        until = ", ".join(f"{k} {v:g}" for k, v in program.stop_when.model_dump(exclude_none=True).items())
        console.print(f"stop_when (checked after every cycle): {until}")


@protocol_app.command("check")
def check(
    file: str = typer.Argument(..., help="protocol file, or a name in labtwin/protocols/library"),
    channel: str = typer.Option(..., "--channel", "-c", help="the channel it would run on"),
    lab: Path | None = LabOpt,
    capacity: float | None = typer.Option(None, "--capacity", help="nominal capacity in Ah, for C-rates"),
) -> None:
    """Check a protocol against a channel's limits and cell without running anything (exit 1 if refused)."""
    protocol, commands, cfg = _compile(file, channel, lab, capacity)
    chemistry = protocol.metadata.chemistry
    if chemistry and cfg is not None and cfg.cell:
        from labtwin.physics.library import load_cell

        cell_chemistry = load_cell(cfg.cell).chemistry
        if cell_chemistry and cell_chemistry != chemistry:
            _fail(f"{file} is written for {chemistry}; channel {channel}'s cell is {cell_chemistry}")
    from labtwin.protocols.compile import LoopEnd, compile_program

    program = compile_program(protocol, _context(channel, lab, capacity)[0])
    budget_h = sum(c.time_budget_s() for c in commands) / 3600
    loops = [i for i in program.instructions if isinstance(i, LoopEnd)]
    length = (
        f"longest possible run {budget_h:.3g} h of cell time"
        if not loops
        else f"{budget_h:.3g} h of cell time at most per pass with each loop run once "
        f"(loops run up to {', '.join(str(i.max_cycles) for i in loops)} cycles)"
    )
    console.print(
        f"ok: {len(commands)} steps fit channel {channel} (limits {cfg.limits.model_dump(exclude_none=True)}); {length}"
    )


@protocol_app.command("export")
def export(
    file: str = typer.Argument(..., help="protocol file, or a name in labtwin/protocols/library"),
    to: str = typer.Option("pybamm", "--to", help="target format: pybamm (an Experiment's operating conditions)"),
) -> None:
    """Export to another tool's form, to cross-check a protocol there (PyBaMM's Experiment today)."""
    from labtwin.protocols.model import ProtocolError, load_protocol
    from labtwin.protocols.strings import StepStringError, to_pybamm

    if to != "pybamm":
        _fail(f"--to {to!r}: only pybamm is supported (BioLogic .mps and Arbin schedules are the next candidates)")
    from labtwin.cli.wiring import check_text_file
    from labtwin.protocols.model import resolve_protocol_path

    try:
        check_text_file(resolve_protocol_path(file), "a protocol")
        conditions = to_pybamm(load_protocol(file))
    except (ProtocolError, StepStringError) as exc:
        _fail(str(exc))
    print(json.dumps(conditions, indent=1))


@schema_app.command("protocol")
def schema_protocol() -> None:
    """JSON Schema of a protocol file: `labtwin schema protocol > protocol.schema.json`."""
    from labtwin.protocols.model import Protocol

    schema = Protocol.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "labtwin protocol"
    print(json.dumps(schema, indent=1))
