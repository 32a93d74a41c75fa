"""The ``labtwin`` command line. Every command that prints results accepts ``--json``.

Settings (lab file, broker, store, speed) resolve through ``labtwin.config.settings.Settings`` for every
command: flag, then environment variable, then the lab file, then the built-in default
(docs/configuration.md). Errors a user can fix are one line on stderr and a non-zero exit
(``labtwin.cli.errors`` lists the exit codes). Protocol, lab and cell files are read and checked before
Prefect is imported, so a mistake in them is reported before anything starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from labtwin.cli.consoles import results_console
from labtwin.cli.errors import EXIT_INTERRUPTED, EXIT_RUN_FAILED, LabtwinGroup, UserError

# Only typer, rich and labtwin.cli's own small modules at import: `labtwin --help` and `--version` must not
# pay for the settings (pydantic-settings, the lab and alert models, httpx), the store (SQLAlchemy), the
# security room, numpy, nor asyncio (25-35 ms, most of it ssl and concurrent.futures). Each command imports
# what it uses when it runs (tests/test_cli_startup.py; bench/cli_startup.py measures it).
if TYPE_CHECKING:
    from labtwin.config.settings import Settings
    from labtwin.security import BrokerConnection

app = typer.Typer(
    cls=LabtwinGroup,
    add_completion=False,
    no_args_is_help=True,
    help="labtwin: run battery test protocols as Prefect flows over MQTT on real or simulated potentiostats.",
)
console = results_console()
err = Console(stderr=True)

from labtwin.cli.options import BrokerOpt, JsonOpt, LabOpt, Mode, ProgressOpt, SpeedOpt, StoreOpt, progress_mode  # noqa: E402


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version  # ~15 ms: only for --version

        try:
            typer.echo(f"labtwin {version('labtwin')}")
        except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
            typer.echo("labtwin (not installed: no package metadata)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print labtwin's version and exit"
    ),
) -> None:
    """labtwin: run battery test protocols as Prefect flows over MQTT on real or simulated potentiostats."""
    from labtwin.orchestration.prefect_env import use_prefect_defaults
    from labtwin.security.log_redaction import install_log_redaction

    install_log_redaction()  # every command: no URL or DSN password in any log line, whoever logs it
    # Before any command imports Prefect (it reads its settings once, at import): labtwin's defaults.
    use_prefect_defaults(quiet_logging=True)


def settings(**flags: Any) -> Settings:
    """The command's settings by the one precedence rule; a bad value is a user error naming it."""
    from pydantic import ValidationError

    from labtwin.config.settings import Settings

    try:
        return Settings.resolve(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise UserError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None


def _needs_broker(s: Settings, who: str, identity: str) -> BrokerConnection:
    """The lab's broker for a process acting as ``identity`` (its role in the lab's security profile)."""
    connection = s.connection(identity)
    if connection is None:
        raise UserError(
            f"{who} needs the lab's broker: --broker mqtt://host:port or mqtts://host:8883, LABTWIN_BROKER, the lab file's broker: "
            f"({s.lab_file}), or start one with `labtwin broker`"
        )
    return connection


def _setup_logging(verbose: bool) -> None:
    """Log lines on stderr (-v: INFO), every record redacted first: no password of a URL or DSN in any line,
    whichever library logs it, nor in the flow-run logs Prefect stores (labtwin.security.log_redaction)."""
    from labtwin.security.log_redaction import install_log_redaction

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _summary_table(summary) -> Table:
    from labtwin.analysis.summary import RunSummary

    s: RunSummary = summary
    wall = f"{s.wall_time_s:.1f} s wall" if s.wall_time_s is not None else ""
    table = Table(
        title=f"{s.channel} · {s.cell_id} · {s.protocol}\n{s.exit_status}"
        f"{(' (' + s.reason + ')') if s.reason else ''} · {s.steps_run} steps · {s.n_samples} samples · "
        f"{s.cell_time_s / 3600:.2f} h cell time · {wall}",
    )
    for col in ("cycle", "charge / mAh", "discharge / mAh", "CE / %", "end of charge / V", "end of discharge / V"):
        table.add_column(col, justify="right")
    cycles = s.cycles if len(s.cycles) <= 24 else [*s.cycles[:10], None, *s.cycles[-10:]]
    for c in cycles:
        if c is None:
            table.add_row("...", "", "", "", "", "")
            continue
        table.add_row(
            str(c.cycle),
            f"{c.charge_Ah * 1e3:.4g}",
            f"{c.discharge_Ah * 1e3:.4g}",
            "" if c.coulombic_efficiency is None else f"{100 * c.coulombic_efficiency:.2f}",
            "" if c.end_of_charge_V is None else f"{c.end_of_charge_V:.3f}",
            "" if c.end_of_discharge_V is None else f"{c.end_of_discharge_V:.3f}",
        )
    return table


def _anomaly_table(anomalies) -> Table:
    table = Table(title="what the twin flagged")
    for col in ("kind", "cell", "test time / h", "cycle", "action"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=18)
    table.add_column("what", ratio=1)
    for a in anomalies:
        table.add_row(
            a.kind, a.cell, f"{a.time_s / 3600:.2f}", "" if a.cycle is None else str(a.cycle), a.action, a.message
        )
    return table


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    broker: str | None = BrokerOpt,
    store: str | None = StoreOpt,
    out: Path = typer.Option(Path("labtwin-data"), "--out", help="where plots go"),
    as_json: bool = JsonOpt,
    show_progress: bool | None = ProgressOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    dashboard_port: int = typer.Option(8050, "--dashboard-port", help="the dashboard's port (taken: any free one)"),
    no_dashboard: bool = typer.Option(False, "--no-dashboard", help="run without the web dashboard"),
    stay: bool = typer.Option(
        False, "--stay", help="keep the dashboard (and the demo's broker) up after the demo ends, until Ctrl-C"
    ),
) -> None:
    """The whole mission on the embedded defaults: broker, agents, recorder, Prefect flows, store, plots, dashboard."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.demo import run_demo
    from labtwin.config.lab import DEFAULT_LAB_FILE

    # The demo's plan names the packaged lab's channels, so its lab file is that one whatever LABTWIN_LAB says.
    s = settings(lab=DEFAULT_LAB_FILE, broker=broker, store=store)
    mode = progress_mode(show_progress, as_json, err)
    result = asyncio.run(
        run_demo(
            s.connection(),
            s.store,
            out,
            console,
            quiet=as_json,
            security=s.security,
            progress=mode,
            dashboard_port=None if no_dashboard else dashboard_port,
            stay=stay,
        )
    )
    if as_json:
        _print_json(result)


# --------------------------------------------------------------------------- run / dryrun


@app.command()
def run(
    protocol: str = typer.Argument(..., help="protocol file, or a name in labtwin/protocols/library"),
    channel: str = typer.Option(..., "--channel", "-c", help="channel name from the lab file"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    store: str | None = StoreOpt,
    speed: str | None = SpeedOpt,
    as_json: bool = JsonOpt,
    resume_run: str | None = typer.Option(
        None,
        "--resume",
        help="go on with this interrupted run (its id or a unique prefix, from `labtwin runs`) where the store has it",
    ),
    show_progress: bool | None = ProgressOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a protocol on a channel as a Prefect flow (exit 1 if the run ends failed or aborted).

    With a broker (--broker, LABTWIN_BROKER or the lab file) the flow drives the
    channel's agent wherever it runs; with none, this process starts an embedded
    broker, the channel's agent and a recorder. Ctrl-C stops the run (output off)
    and leaves it marked interrupted in the store.
    """
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.wiring import channel_capacity_Ah, check_channel, check_protocol

    s = settings(lab=lab, broker=broker, store=store, speed=speed)
    config = s.lab_config
    cfg = config.channel(channel)
    # Before Prefect: mistakes in one line. Compiled here only when this process runs the channel's agent and
    # knows its capacity; otherwise the flow compiles against what the agent reports.
    capacity_Ah = channel_capacity_Ah(cfg)
    local = s.broker is None
    check_protocol(protocol, capacity_Ah, cfg.limits, compile=local and capacity_Ah is not None)
    resume = _resume_state(s, resume_run, channel) if resume_run else None
    connection = s.connection("orchestrator")
    if connection is not None:
        asyncio.run(check_channel(connection, config.lab, channel, own_run=resume.run_id if resume else None))
    from labtwin.cli.interrupt import RunInterrupted

    try:
        summary = asyncio.run(_run(s, protocol, channel, resume, progress_mode(show_progress, as_json, err)))
    except RunInterrupted as exc:
        err.print(str(exc), highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        _print_json(summary.model_dump())
    else:
        console.print(_summary_table(summary))
    if summary.exit_status != "success":
        raise typer.Exit(EXIT_RUN_FAILED)


def _resume_state(s: Settings, prefix: str, channel: str) -> Any:
    """What the store says of the run to resume: refused in one line unless it is interrupted, on this channel."""
    from labtwin.cli.wiring import open_store
    from labtwin.orchestration.resume import read_run

    store_ = open_store(s.store)
    try:
        try:
            run_id = store_.find_run(prefix)
        except KeyError as exc:
            raise UserError(f"--resume: {exc.args[0]}") from None
        record = read_run(store_, run_id)
    finally:
        store_.close()
    if record.state == "finished":
        raise UserError(
            f"--resume {run_id}: the run already ended ({record.exit_status}); a run id is used once: start a new run"
        )
    if record.resume is None:
        raise UserError(f"--resume {run_id}: the store has no RunStart of it: start a new run")
    if record.resume.channel and record.resume.channel != channel:
        raise UserError(
            f"--resume {run_id}: the run is on channel {record.resume.channel}, not {channel}: use --channel {record.resume.channel}"
        )
    return record.resume


async def _run(s: Settings, protocol: str, channel: str, resume: Any = None, progress: Mode = "off"):
    from labtwin.cli.interrupt import new_run_id, stop_on_interrupt
    from labtwin.cli.progress import follow_progress
    from labtwin.cli.wiring import LocalLab
    from labtwin.orchestration.flows import begin_prefect_api, run_protocol, start_prefect_api

    config = s.lab_config
    begin_prefect_api()  # starts in its own process while the lab comes up
    run_id = resume.run_id if resume is not None else new_run_id(channel)
    connection = s.connection("orchestrator")
    if connection is not None:
        await start_prefect_api()
        async with follow_progress(connection, config.lab, progress, err, [channel]):
            return await stop_on_interrupt(
                run_protocol(protocol, channel, connection, lab=config.lab, run_id=run_id, resume=resume),
                connection,
                config.lab,
                channel,
                run_id,
                s.store,
            )
    async with LocalLab(config, [channel], None, s.store, s.speed_value) as local:
        await start_prefect_api()
        async with follow_progress(local.url, config.lab, progress, err, [channel]):
            summary = await stop_on_interrupt(
                run_protocol(protocol, channel, local.url, lab=config.lab, run_id=run_id, resume=resume),
                local.url,
                config.lab,
                channel,
                run_id,
                s.store,
                stored=local.wait_stored,
            )
        await local.wait_stored(summary.run_id)
        return summary


@app.command()
def dryrun(
    protocol: str = typer.Argument(..., help="protocol file, or a name in labtwin/protocols/library"),
    sim: str = typer.Option(..., "--sim", help="simulated cell: a name in labtwin/physics/cells or a YAML path"),
    out: Path | None = typer.Option(None, "--out", help="write samples.csv and summary.json here"),
    channel_limits: str | None = typer.Option(None, "--channel", help="hold it to this lab channel's limits"),
    lab: Path | None = LabOpt,
    with_twin: bool = typer.Option(True, "--twin/--no-twin", help="let the twin follow the run and report anomalies"),
    speed: str = typer.Option(
        "max",
        "--speed",
        help="cell s per wall s, or max; finite speeds land the twin's pause/stop where a real run would",
    ),
    as_json: bool = JsonOpt,
    show_progress: bool | None = ProgressOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a protocol against a simulated cell at max speed: how long, which limits end each step, what the twin flags.

    Exit 1 when the dry-run ends failed (a safety limit, an error): the protocol would fail on a real
    channel too. A stop the protocol's own anomaly policy asks for (aborted) is what it was written to do."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.wiring import check_cell, check_protocol
    from labtwin.devices.clock import parse_speed

    try:
        speed_value = parse_speed(speed) or "max"
    except ValueError as exc:
        raise UserError(f"--speed: {exc}") from None
    cell = check_cell(sim)
    limits = settings(lab=lab).lab_config.channel(channel_limits).limits if channel_limits else None
    check_protocol(protocol, cell.nominal_capacity_Ah, limits)  # before Prefect: mistakes in one line
    if out is not None and out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; give a directory for samples.csv, summary.json and the plots")
    from labtwin.cli.dryrun import run_dryrun

    mode = progress_mode(show_progress, as_json, err)
    summary, anomalies = asyncio.run(
        run_dryrun(protocol, sim, out, channel_limits, lab, with_twin, speed_value, mode, err)
    )
    if as_json:
        _print_json({**summary.model_dump(), "anomalies": [a.model_dump(mode="json") for a in anomalies]})
    else:
        _print_dryrun(summary, anomalies, with_twin, out)
    if summary.exit_status == "failed":
        raise typer.Exit(EXIT_RUN_FAILED)


def _print_dryrun(summary, anomalies, with_twin: bool, out: Path | None) -> None:
    console.print(_summary_table(summary))
    steps = Table(title="how each step ended")
    for col in ("step", "cycle", "label", "ended by", "value", "duration / s"):
        steps.add_column(col)
    shown = summary.step_ends
    if len(shown) > 30:  # a 50-cycle protocol has 100+ steps: the first and last ones tell the story
        shown = [*shown[:12], None, *shown[-12:]]
    for e in shown:
        if e is None:
            steps.add_row("...", "", f"{len(summary.step_ends) - 24} more steps (summary.json has all)", "", "", "")
            continue
        steps.add_row(
            str(e.step_index),
            str(e.cycle),
            e.label,
            e.reason,
            "" if e.value is None else f"{e.value:.4g}",
            f"{e.duration_s:.0f}",
        )
    console.print(steps)
    console.print(f"estimated duration on a real channel: [bold]{summary.cell_time_s / 3600:.2f} h[/]")
    if with_twin:
        console.print(_anomaly_table(anomalies) if anomalies else "the twin flagged nothing")
    if out:
        names = (
            "samples.csv",
            "eis.csv",
            "summary.json",
            "anomalies.json",
            "run.png",
            "nyquist.png",
            "cv.png",
            "plateau.png",
        )
        written = [name for name in names if (out / name).exists()]
        console.print(f"wrote {', '.join(written)} in {out}")


# --------------------------------------------------------------------------- services


@app.command()
def agent(
    channel: str = typer.Option(..., "--channel", "-c"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    speed: str | None = SpeedOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    supervise: bool = typer.Option(
        False,
        "--supervise",
        help="run the agent as a child process and start it again whenever it dies (back-off 1 s doubling to "
        "30 s); Ctrl-C or SIGTERM stops both",
    ),
) -> None:
    """Serve one channel: run its steps and enforce its limits next to the instrument."""
    import asyncio

    _setup_logging(verbose)
    if supervise:
        from labtwin.cli.supervise import supervise as run_supervised

        args = ["agent", "--channel", channel]
        for flag, value in (("--broker", broker), ("--lab", lab), ("--speed", speed)):
            if value is not None:
                args += [flag, str(value)]
        if verbose:
            args.append("--verbose")
        err.print(f"supervising the agent for channel {channel}: restarted whenever it dies; Ctrl-C stops both")
        raise typer.Exit(run_supervised(args))
    from labtwin.agent.service import Agent
    from labtwin.agent.spool import Spool
    from labtwin.cli.wiring import build_channel
    from labtwin.security.profile import agent_identity

    s = settings(lab=lab, broker=broker, speed=speed)
    config = s.lab_config
    cfg = config.channel(channel)
    url = _needs_broker(s, "an agent", agent_identity(channel))
    # The spool first: a second agent of this channel here is refused (SpoolBusy, one line) before its driver is
    # built, since opening a driver already talks to the instrument the first agent is driving.
    spool = Spool.for_channel(config.lab, channel, config.spool_dir)
    try:
        built = build_channel(channel, cfg, s.speed_value, config.lab)
    except BaseException:
        spool.close()
        raise
    a = Agent(
        lab=config.lab,
        channel=channel,
        driver=built.driver,
        clock=built.clock,
        broker_url=url,
        channel_limits=cfg.limits,
        cell_id=built.cell_id,
        nominal_capacity_Ah=built.nominal_capacity_Ah,
        driver_name=built.driver_name,
        spool=spool,
    )
    err.print(f"agent for {config.lab}/{channel} ({built.driver_name}) on {url}; Ctrl-C stops it safely")

    async def _serve() -> None:
        # SIGTERM (a supervisor, systemd, the leash) and Ctrl-C stop the agent the same clean way: output off, the
        # spool handed over, status offline, even in the moment after its first status (a cancelled task there
        # skipped the offline status). A second Ctrl-C is Python's own: KeyboardInterrupt, at once.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_sigint() -> None:
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(NotImplementedError):  # no signal handlers on this platform: Ctrl-C as before
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        await a.serve(stop)

    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        pass


@app.command()
def record(
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    store: str | None = StoreOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Write every data and event document of the lab into the store."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.wiring import open_store
    from labtwin.data.engine import describe_url
    from labtwin.data.recorder import Recorder

    s = settings(lab=lab, broker=broker, store=store)
    url = _needs_broker(s, "the recorder", "recorder")
    config = s.lab_config
    from labtwin.bus.sessions import claim_session

    store_ = open_store(s.store)
    recorder = Recorder(url, store_, config.lab)
    try:
        # Its session first: a second recorder of this lab in this directory is refused before it says it records.
        session = claim_session(recorder.session_name)
        recorder.client_id = session.client_id
        err.print(f"recording lab {config.lab} from {url} into {describe_url(store_.url)}; Ctrl-C stops")
        try:
            asyncio.run(recorder.serve())
        except KeyboardInterrupt:
            pass
        finally:
            session.release()
    finally:
        store_.close()


@app.command()
def twin(
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Follow every cell of the lab: model in the loop, live estimates, anomalies on .../cells/<cell>/anomaly."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.wiring import twin_factory
    from labtwin.twin.service import TwinService

    s = settings(lab=lab, broker=broker)
    url = _needs_broker(s, "the twin", "twin")
    from labtwin.bus.sessions import claim_session

    config = s.lab_config
    service = TwinService(url, twin_factory(config), config.lab)
    # Its session first: a second twin of this lab in this directory is refused before it says it follows.
    session = claim_session(service.session_name)
    service.client_id = session.client_id
    err.print(
        f"twin following lab {config.lab} on {url}; state on labtwin/v1/{config.lab}/cells/<cell>/state; Ctrl-C stops"
    )

    async def _serve() -> None:
        task = asyncio.create_task(service.serve())
        seen = 0
        while not task.done():
            await asyncio.sleep(0.2)
            for anomaly in service.anomalies[seen:]:
                console.print(f"[bold red]{anomaly.kind}[/] {anomaly.cell} t={anomaly.time_s:.0f} s: {anomaly.message}")
            seen = len(service.anomalies)
        await task

    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        pass
    finally:
        session.release()


@app.command()
def replay(
    file: Path = typer.Argument(
        ..., help="a recording: labtwin samples.csv (or its directory), BDF .csv, or EC-Lab .mpr"
    ),
    speed: str = typer.Option("max", "--speed", help="1 = as recorded, 1000, or max"),
    model: str | None = typer.Option(
        None, "--model", help="cell definition to run in the loop (labtwin/physics/cells)"
    ),
    circuit: str | None = typer.Option(None, "--circuit", help="circuit the twin fits to spectra"),
    cell: str | None = typer.Option(None, "--cell", help="cell id to report (default: the file's name)"),
    broker: str | None = typer.Option(
        None, "--broker", help="mqtt://host:port (default: LABTWIN_BROKER, the lab file's broker:, else embedded)"
    ),
    lab: Path | None = LabOpt,
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Replay recorded data through the bus; the twin and its detectors run on it exactly as live."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.cli.replay import run_replay
    from labtwin.cli.wiring import check_cell
    from labtwin.devices.clock import parse_speed

    try:
        speed_value = parse_speed(speed)
    except ValueError as exc:
        raise UserError(f"--speed: {exc}") from None
    if not file.exists():
        raise UserError(f"{file}: no such file or directory: give a samples.csv, a BDF .csv or an EC-Lab .mpr")
    if model is not None:
        check_cell(model)
    s = settings(lab=lab, broker=broker)
    summary, anomalies = asyncio.run(run_replay(file, s.broker, speed_value, model, circuit, cell))
    if as_json:
        _print_json({"anomalies": [a.model_dump(mode="json") for a in anomalies], "replayed": summary})
        return
    console.print(
        f"replayed {summary['file']} ({summary['format']}): {summary['samples']} samples, {summary['steps']} steps, "
        f"{summary['cycles']} cycles, {summary['impedance_spectra']} impedance spectra, "
        f"{summary['cell_time_s'] / 3600:.2f} h of test time in {summary['wall_time_s']:.1f} s"
    )
    if model is None and summary["nominal_capacity_Ah"] is not None:
        console.print(
            f"no --model: the detectors use a nominal capacity of {summary['nominal_capacity_Ah']:.4g} Ah, "
            f"{summary['nominal_capacity_source']}"
        )
    console.print(_anomaly_table(anomalies) if anomalies else "the twin flagged nothing")


@app.command()
def broker(
    port: int = typer.Option(1883, "--port"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="beyond loopback (0.0.0.0) it needs --password-file, and still has no TLS"
    ),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="amqtt password file (labtwin lab secure writes passwd.amqtt)"
    ),
) -> None:
    """Run the embedded MQTT broker on its own (for agents in other processes on this machine)."""
    import asyncio

    from labtwin.bus.broker import BrokerSetupError, EmbeddedBroker

    try:
        embedded = EmbeddedBroker(host, port, password_file)
    except BrokerSetupError as exc:
        raise UserError(str(exc)) from None

    async def _serve():
        async with embedded as b:
            err.print(f"embedded broker on {b.url} ({b.protection}); Ctrl-C stops")
            await asyncio.Event().wait()

    import socket

    from amqtt.errors import BrokerError

    with socket.socket() as probe:  # before amqtt, which logs a traceback of its own for a port in use
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    try:
        asyncio.run(_serve())
    except KeyboardInterrupt:
        pass
    except (OSError, BrokerError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc}; choose another --port") from None


def _channel_command(channel: str, broker: str | None, lab: Path | None, order) -> str:
    import asyncio

    from labtwin.bus.operator import CommandFailed, command_channel
    from labtwin.cli.errors import EXIT_REFUSED, EXIT_USER_ERROR

    s = settings(lab=lab, broker=broker)
    url = _needs_broker(s, order.verb, "operator")
    config = s.lab_config
    config.channel(channel)
    try:
        return asyncio.run(command_channel(url, config.lab, channel, order))
    except CommandFailed as exc:
        raise UserError(str(exc), EXIT_REFUSED if exc.refused else EXIT_USER_ERROR) from None


@app.command()
def pause(
    channel: str = typer.Option(..., "--channel", "-c"),
    reason: str = typer.Option("operator", "--reason"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
) -> None:
    """Hold the run on a channel: open circuit within one sample, still sampling and checking limits.

    Exits 3 if the agent does not confirm it (the broker or the agent refused the command)."""
    from labtwin.bus.operator import pause_order

    run_id = _channel_command(channel, broker, lab, pause_order(reason))
    console.print(f"paused run {run_id} on {channel}")


@app.command()
def resume(
    channel: str = typer.Option(..., "--channel", "-c"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
) -> None:
    """Let a paused run go on where it stopped (the step's source setting is re-applied); exits 3 if refused."""
    from labtwin.bus.operator import resume_order

    run_id = _channel_command(channel, broker, lab, resume_order())
    console.print(f"resumed run {run_id} on {channel}")


@app.command()
def stop(
    channel: str = typer.Option(..., "--channel", "-c"),
    reason: str = typer.Option("stopped by operator", "--reason"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
) -> None:
    """Stop the run on a channel (output off, the run marked aborted with the reason); exits 3 if refused."""
    from labtwin.bus.operator import stop_order

    run_id = _channel_command(channel, broker, lab, stop_order(reason))
    console.print(f"stopped run {run_id} on {channel} (aborted: {reason})")


@app.command()
def dashboard(
    broker: str | None = BrokerOpt,
    store: str | None = StoreOpt,
    lab: Path | None = LabOpt,
    lab_name: str = typer.Option("+", "--lab-name", help="only this lab (default: every lab on the broker)"),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="address to listen on (beyond loopback: give TLS and --users)"
    ),
    port: int = typer.Option(8050, "--port", help="port to listen on (0: any free one)"),
    users: Path | None = typer.Option(
        None, "--users", help="logins file (`labtwin dashboard-user`); without one every visitor is a viewer"
    ),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS"),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    session_hours: float = typer.Option(8.0, "--session-hours", help="an idle login expires after this long"),
    prefect_ui: str | None = typer.Option(None, "--prefect-ui", help="link campaign runs to this Prefect UI"),
    send_alerts: bool = typer.Option(
        False, "--send-alerts", help="also send the lab file's alerts (instead of `labtwin alerts watch`)"
    ),
    campaign_files: list[Path] = typer.Option(
        [], "--campaign", help="a campaign file whose jobs and schedule the campaigns page shows (repeatable)"
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """A live web dashboard of the lab: channel tiles, run plots, operator actions (docs/dashboard.md)."""
    import asyncio

    _setup_logging(verbose)
    from labtwin.dashboard.app import DashboardConfig
    from labtwin.dashboard.auth import Sessions, UsersFileError, load_users
    from labtwin.dashboard.server import DashboardServer
    from labtwin.data.engine import describe_url
    from labtwin.orchestration.campaign import load_campaign

    s = settings(lab=lab, broker=broker, store=store)
    url = _needs_broker(s, "dashboard", "viewer")
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: use 0 to 65535")
    if session_hours <= 0:
        raise UserError(f"--session-hours {session_hours}: must be above 0")
    try:
        logins = load_users(users) if users is not None else None
    except UsersFileError as exc:
        raise UserError(f"--users {exc}") from None
    for name, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise UserError(f"{name} {path}: no such file")
    from labtwin.protocols.model import ProtocolError

    try:
        campaigns = [load_campaign(p) for p in campaign_files]
    except ProtocolError as exc:
        raise UserError(str(exc)) from None
    from labtwin.data.engine import StoreURLError, parse_url
    from labtwin.data.store import Store

    try:
        where = parse_url(s.store)
    except StoreURLError as exc:
        raise UserError(f"--store {describe_url(s.store)}: cannot be opened: {exc}") from None
    if where.path is not None and str(where.path) != ":memory:" and not where.path.exists():
        # The dashboard shows what a recorder stored: a mistyped path made a new, empty store (and its folders)
        # and served an empty lab.
        raise UserError(
            f"--store {where.path}: no store there; give the store the lab's recorder writes (`labtwin runs "
            "--store URL` lists its runs)"
        )
    try:  # a store the dashboard cannot open is a mistake to say now, not on every page
        Store.open(s.store).close()
    except Exception as exc:
        raise UserError(f"--store {describe_url(s.store)}: cannot be opened: {exc}") from None
    config = DashboardConfig(
        broker=url,
        store_url=s.store,
        lab=lab_name,
        host=host,
        port=port,
        sessions=Sessions(logins, idle_timeout_s=session_hours * 3600),
        prefect_ui_url=prefect_ui,
        alerts=s.lab_config.alerts,
        alerts_lab=s.lab_config.lab,
        alerts_cells={name: ch.cell_id for name, ch in s.lab_config.channels.items() if ch.cell_id},
        send_alerts=send_alerts,
        campaigns=campaigns,
    )

    async def main() -> None:
        server = DashboardServer(config, tls_cert, tls_key)
        await server.start()
        err.print(f"labtwin dashboard at {server.url} (broker {url}, store {describe_url(s.store)})", soft_wrap=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"listening on {server.listening}", soft_wrap=True)
        if server.warning:
            err.print(f"[yellow]warning[/]: {server.warning}")
        try:
            await server.serve_forever()
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        pass


@app.command("dashboard-user")
def dashboard_user(
    name: str = typer.Argument(..., help="the login name"),
    role: str = typer.Option("viewer", "--role", help="viewer (read only) or operator (pause, resume, stop)"),
    users: Path = typer.Option(Path("labtwin-data/dashboard-users.json"), "--users", help="the logins file"),
    password_env: str | None = typer.Option(
        None, "--password-env", help="read the password from this environment variable instead of a prompt"
    ),
) -> None:
    """Add or replace a dashboard login (its password is stored as an scrypt hash, never in clear)."""
    import os

    from labtwin.dashboard.auth import UsersFileError, add_user

    if role not in ("viewer", "operator"):
        raise UserError(f"--role {role!r}: use viewer or operator")
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise UserError(f"--password-env {password_env}: that environment variable is not set")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    try:
        add_user(users, name, role, password)  # type: ignore[arg-type]
    except UsersFileError as exc:
        raise UserError(str(exc)) from None
    console.print(f"{users}: {name} is a dashboard {role}")


@app.command()
def monitor(
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    lab_name: str = typer.Option("+", "--lab-name", help="only this lab (default: all)"),
    seconds: float | None = typer.Option(None, "--seconds", help="stop after this long"),
) -> None:
    """Live view of every channel's status, step, voltage, current and the latest events (MQTT only)."""
    import asyncio

    from labtwin.cli.monitor import monitor as run_monitor

    url = _needs_broker(settings(lab=lab, broker=broker), "monitor", "viewer")
    try:
        asyncio.run(run_monitor(url, lab_name, seconds, console))
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- the store


@app.command()
def runs(store: str | None = StoreOpt, lab: Path | None = LabOpt, as_json: bool = JsonOpt) -> None:
    """The runs in the store."""
    from labtwin.cli.wiring import open_store
    from labtwin.data.engine import describe_url

    s = open_store(settings(lab=lab, store=store).store)
    rows = s.runs()
    if as_json:
        _print_json([r.__dict__ for r in rows])
        return
    table = Table(title=f"runs in {describe_url(s.url)}")
    table.add_column("run", no_wrap=True)  # a run id is copied into `export` / `analyze`: never cut
    # A conflict is a batch that reused a stored (run_id, seq) with other samples (a forgery?): the column shows
    # only when a run has one, so the usual table stays as it was.
    with_conflicts = any(r.conflicts for r in rows)
    # An outage (an agent restart mid-run: no one read the instrument) is on the record; shown when a run has one.
    with_outages = any(r.outages for r in rows)
    columns = ("channel", "cell", "protocol", "started", "status", "samples", "cell time / h")
    for col in columns + (("conflicts",) if with_conflicts else ()) + (("outages",) if with_outages else ()):
        table.add_column(col)
    for r in rows:
        cells = [
            r.run_id,
            r.channel or "",
            r.cell_id or "",
            r.protocol or "",
            (r.started_at or "")[:19],
            r.exit_status or ("running?" if r.announced else "no RunStart"),
            f"{r.stored_samples}"
            + ("" if r.reported_samples in (None, r.stored_samples) else f" of {r.reported_samples}"),
            "" if r.cell_time_s is None else f"{r.cell_time_s / 3600:.2f}",
        ]
        if with_conflicts:
            cells.append(str(r.conflicts or ""))
        if with_outages:
            cells.append(f"{r.outages} ({r.outage_s:.0f} s)" if r.outages else "")
        table.add_row(*cells)
    console.print(table)
    if with_conflicts:
        console.print(
            "conflicts: batches that reused a stored sequence number with other samples; the stored ones stay, "
            "the others are kept in the store's batch_conflicts table"
        )
    if any(not r.announced for r in rows):
        console.print(
            "no RunStart: samples stored under a run id no run document named (an agent whose RunStart was lost, "
            "or batches published by someone else); check them before trusting them"
        )
    if with_outages:
        console.print(
            "outages: stretches of cell time in which no agent read the instrument (an agent restarted mid-run); "
            "the samples have a hole there"
        )


@app.command()
def export(
    run_id: str = typer.Argument(..., help="run id or a unique prefix"),
    fmt: str = typer.Option("csv", "--format", help="csv, parquet or bdf (Battery Data Format)"),
    out: Path | None = typer.Option(None, "--out"),
    store: str | None = StoreOpt,
    lab: Path | None = LabOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export a run's samples with unit-bearing column names."""
    from labtwin.cli.wiring import open_store
    from labtwin.data.export import FORMATS, export_samples

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not known: use one of {', '.join(FORMATS)}")
    s = open_store(settings(lab=lab, store=store).store)
    try:
        rid = s.find_run(run_id)
    except KeyError as exc:
        raise UserError(str(exc.args[0])) from None
    start, _ = s.run_documents(rid)
    suffix = {"csv": ".csv", "parquet": ".parquet", "bdf": ".bdf"}[fmt]
    path = out or Path(f"{rid}{suffix}")
    if path.is_dir():
        raise UserError(f"--out {path}: is a directory; give a file name")
    samples = s.samples(rid)
    try:
        export_samples(samples, path, fmt, start.time.timestamp() if start else None)
    except OSError as exc:
        raise UserError(f"--out {path}: cannot be written: {exc.strerror or exc}") from None
    if as_json:
        _print_json({"run_id": rid, "path": str(path), "format": fmt, "samples": int(len(samples["time_s"]))})
    else:
        console.print(f"wrote {len(samples['time_s'])} samples of {rid} to {path}")


@app.command("import")
def import_(
    files: list[Path] = typer.Argument(..., help="cycler files: " + "see `labtwin replay --help` for the formats"),
    cell: str | None = typer.Option(None, "--cell", help="the cell's id (default: the file's name)"),
    nominal_capacity_Ah: float | None = typer.Option(
        None, "--nominal-capacity-Ah", min=0.0, help="the cell's nominal capacity, kept with the run"
    ),
    store: str | None = StoreOpt,
    lab: Path | None = LabOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Store cycler files as runs (samples, steps, cycles, spectra); the same file twice is stored once."""
    from labtwin.cli.import_files import import_file
    from labtwin.cli.wiring import open_store

    cfg = settings(lab=lab, store=store)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UserError(f"{', '.join(missing)}: no such file; nothing was imported")
    s = open_store(cfg.store)
    results: list[dict[str, Any]] = []
    for path in files:
        # Each file is said as it is stored: a later file that cannot be read stops the command (exit 2), and
        # what was stored before it is on the screen, not silently in the store.
        try:
            r = import_file(s, path, lab=cfg.lab_config.lab, cell=cell, nominal_capacity_Ah=nominal_capacity_Ah)
        except Exception:
            if results and not as_json:
                stored = ", ".join(x["run_id"] for x in results if x["imported"])
                console.print(f"stored before the error: {stored}", soft_wrap=True)
            raise
        results.append(r)
        if as_json:
            continue
        if r["imported"]:
            console.print(
                f"{r['file']}: stored as run {r['run_id']} ({r['format']}, cell {r['cell_id']}, {r['samples']} samples, "
                f"{r['steps']} steps, {r['cycles']} cycles)",
                soft_wrap=True,  # a path and a run id are copied from here: never folded
            )
            if r["nominal_capacity_Ah"] is not None:
                console.print(
                    f"  nominal capacity {r['nominal_capacity_Ah']:.4g} Ah ({r['nominal_capacity_source']})",
                    soft_wrap=True,
                )
            for note in r["notes"]:
                console.print(f"  note: {note}", soft_wrap=True)
        else:
            console.print(f"{r['file']}: {r['reason']}: run {r['run_id']}", soft_wrap=True)
    if as_json:
        _print_json({"imports": results})


from labtwin.cli.alerts import alerts_app  # noqa: E402
from labtwin.cli.analyze import analyze_app  # noqa: E402
from labtwin.cli.campaign import campaign_app  # noqa: E402
from labtwin.cli.db import db_app  # noqa: E402
from labtwin.cli.emulate import emulate_app  # noqa: E402
from labtwin.cli.lab import lab_app  # noqa: E402
from labtwin.cli.protocol import protocol_app, schema_app  # noqa: E402

app.add_typer(analyze_app, name="analyze")
app.add_typer(analyze_app, name="analyse", hidden=True)  # the British spelling works too
app.add_typer(emulate_app, name="emulate")
app.add_typer(protocol_app, name="protocol")
app.add_typer(schema_app, name="schema")
app.add_typer(campaign_app, name="campaign")
app.add_typer(db_app, name="db")
app.add_typer(lab_app, name="lab")
app.add_typer(alerts_app, name="alerts")


def main() -> None:
    app()
