"""`labtwin campaign run|status FILE`: a campaign's jobs, queued per channel, resumed after a crash."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from labtwin.cli.consoles import results_console
from labtwin.cli.options import Mode, ProgressOpt, progress_mode

if TYPE_CHECKING:
    from labtwin.config.settings import Settings

console = results_console()
err = Console(stderr=True)
campaign_app = typer.Typer(
    help="Run a campaign (cells x protocols on channels) and see where it stands.", no_args_is_help=True
)

BrokerOpt = typer.Option(
    None,
    "--broker",
    help="mqtt://host:port of agents elsewhere (default: LABTWIN_BROKER, the lab file's broker:, else embedded, "
    "agents here)",
)
LabOpt = typer.Option(None, "--lab", help="lab file (default: LABTWIN_LAB, the campaign's lab:, the packaged one)")
StoreOpt = typer.Option(
    None,
    "--store",
    help="the store the recorder writes (resume reads it); default LABTWIN_STORE, the lab file's store:, "
    "./labtwin-data/labtwin.db",
)
SpeedOpt = typer.Option(
    None, "--speed", help="simulated channels: 1 = real time, 1000, or max (default: LABTWIN_SPEED, the channel's)"
)


@contextlib.contextmanager
def _store_secret_for_flows(store: str):
    """The store URL for the flows' parameters, without its password; the password reaches the flows this
    process runs (or its Prefect Runner starts) through ``LABTWIN_STORE`` in this process's environment,
    never through Prefect (docs/decisions/0009-secrets-stay-off-prefect.md). Restored afterwards."""
    import os

    from labtwin.data.store_secret import split_password

    bare, password = split_password(store)
    if password is None:
        yield store
        return
    before = os.environ.get("LABTWIN_STORE")
    os.environ["LABTWIN_STORE"] = store
    try:
        yield bare
    finally:
        if before is None:
            os.environ.pop("LABTWIN_STORE", None)
        else:
            os.environ["LABTWIN_STORE"] = before


def _check_store(store: str) -> None:
    """The store opens, before Prefect starts: a wrong URL or password is one line naming it (redacted)."""
    from labtwin.cli.wiring import open_store

    try:
        open_store(store).close()
    except ValueError as exc:  # a URL of another database (mysql://...): parse_url names it, redacted
        _fail(f"{exc} (--store, LABTWIN_STORE or the lab file's store:)")


def _fail(message: str) -> None:
    from labtwin.cli.errors import UserError

    raise UserError(message)


def _load(file: Path, **flags: Any) -> tuple[Any, Settings]:
    """The campaign and its settings (the campaign's `lab:` ranks below --lab and LABTWIN_LAB), checked
    before Prefect starts: the campaign file, the lab file, every channel it names."""
    from labtwin.cli import settings
    from labtwin.orchestration.campaign import channels_of, load_campaign

    if file.is_file():
        try:
            file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(f"{file}: not a text file (byte {exc.start} is not UTF-8): a campaign is a YAML file")
    from labtwin.cli.wiring import check_protocol

    campaign = load_campaign(file)
    s = settings(fallback_lab=campaign.lab, **flags)
    for channel in channels_of(campaign):
        s.lab_config.channel(channel)
    # Every protocol file is read and validated here: a typo in the tenth job's file is refused before the first
    # job starts. Compiling (C-rates, limits) waits for the channel each job gets.
    for name in sorted(
        {p for cell in campaign.cells for p in cell.protocols} | {e.protocol for e in campaign.schedule}
    ):
        check_protocol(name, None, None, compile=False)
    return campaign, s


@campaign_app.command("run")
def run(
    file: Path = typer.Argument(..., help="campaign file"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    store: str | None = StoreOpt,
    speed: str | None = SpeedOpt,
    prefect_db: str | None = typer.Option(
        None,
        "--prefect-db",
        help="database of Prefect's local ephemeral API: "
        "memory (fastest for big campaigns: Prefect's history of this run "
        "is not kept; labtwin's store keeps everything), postgresql://..., "
        "or sqlite:///path (default: SQLite in PREFECT_HOME)",
    ),
    show_progress: bool | None = ProgressOpt,
) -> None:
    """Run every job that has not finished; interrupted ones resume at the step that was cut off."""
    import asyncio
    import os

    from labtwin.security.log_redaction import install_log_redaction

    install_log_redaction()
    campaign, s = _load(file, lab=lab, broker=broker, store=store, speed=speed)
    if prefect_db and os.environ.get("PREFECT_API_URL"):
        _fail("--prefect-db: PREFECT_API_URL names a Prefect server, which has its own database; drop one of them")
    _check_store(s.store)
    from labtwin.orchestration.prefect_server import ephemeral_database

    try:
        with ephemeral_database(prefect_db), _store_secret_for_flows(s.store) as store_param:
            results = asyncio.run(_run(file, campaign, s, store_param, progress_mode(show_progress, False, err)))
    except (ConnectionError, ValueError, TimeoutError) as exc:
        _fail(str(exc))
    table = Table(title=f"campaign {campaign.campaign}")
    for col in ("run", "cell", "protocol", "channel", "outcome", "steps", "resumed"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(
            r.run_id,
            r.cell,
            r.protocol,
            r.channel,
            r.outcome + (f" ({r.reason})" if r.reason else ""),
            str(r.steps_run),
            "yes" if r.resumed else "",
        )
    console.print(table)
    if any(r.outcome not in ("success",) and not r.outcome.startswith("skipped") for r in results):
        raise typer.Exit(1)


async def _run(file: Path, campaign, s: Settings, store_param: str, progress: Mode = "off"):
    """``store_param``: the store URL without its password, what the flows get (the recorder here gets it all).
    ``progress``: a bar per channel of the campaign, each job's run in turn (labtwin.cli.progress)."""
    from labtwin.cli.progress import follow_progress
    from labtwin.cli.wiring import LocalLab
    from labtwin.orchestration.campaign import channels_of
    from labtwin.orchestration.campaign_flow import run_campaign
    from labtwin.orchestration.flows import begin_prefect_api, start_prefect_api

    config = s.lab_config
    begin_prefect_api()  # starts in its own process while the lab comes up
    connection = s.connection("orchestrator")
    lab_file = str(s.lab_file.resolve())
    channels = channels_of(campaign)
    if connection is not None:
        await start_prefect_api()
        async with follow_progress(connection, config.lab, progress, err, channels):
            return await run_campaign(str(file), connection, config.lab, store_param, lab_file=lab_file)
    async with LocalLab(config, channels, None, s.store, s.speed_value) as local:
        await start_prefect_api()
        async with follow_progress(local.url, config.lab, progress, err, channels):
            return await run_campaign(str(file), local.url, config.lab, store_param, lab_file=lab_file)


@campaign_app.command("serve")
def serve(
    file: Path = typer.Argument(..., help="campaign file"),
    broker: str | None = BrokerOpt,
    lab: Path | None = LabOpt,
    store: str | None = StoreOpt,
    speed: str | None = SpeedOpt,
    duration: str | None = typer.Option(
        None, "--for", help="serve this long (30m, 6h, 7d), then stop; default until Ctrl-C"
    ),
    run_now: bool = typer.Option(True, "--run-now/--schedule-only", help="also run the campaign's jobs once, now"),
    prefect_port: int = typer.Option(
        4200,
        "--prefect-port",
        help="port of the local Prefect server (UI and API) started when PREFECT_API_URL is not set",
    ),
    prefect_db: str | None = typer.Option(
        None,
        "--prefect-db",
        help="database of the local Prefect server: "
        "postgresql://user@host:port/db for many cells (default: SQLite "
        "in labtwin-data/prefect)",
    ),
    work_pool: str | None = typer.Option(
        None,
        "--work-pool",
        help="send the deployments to this Prefect work "
        "pool (made as a process pool if missing); its workers run them: "
        "`prefect worker start --pool NAME`. Needs PREFECT_API_URL",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the served flow runs as JSON when it stops"),
) -> None:
    """Serve the campaign through Prefect deployments: its jobs once, and its schedule for as long as it runs.

    With PREFECT_API_URL set, the deployments go to that server; otherwise a local Prefect server starts
    (UI and API on 127.0.0.1:--prefect-port, database in labtwin-data/prefect)."""
    import asyncio
    import os

    from labtwin.orchestration.campaign import interval_s
    from labtwin.security.log_redaction import install_log_redaction

    install_log_redaction()
    campaign, s = _load(file, lab=lab, broker=broker, store=store, speed=speed)
    if work_pool and not os.environ.get("PREFECT_API_URL"):
        _fail(
            "--work-pool: workers on other PCs need a Prefect server they can reach; set PREFECT_API_URL "
            "(e.g. http://<lab-server>:4200/api, a `prefect server start` there), or serve without --work-pool"
        )
    try:
        duration_s = interval_s(duration) if duration else None
    except ValueError as exc:
        _fail(f"--for: {exc}")
    _check_store(s.store)
    try:
        served = asyncio.run(
            _serve(
                file,
                campaign,
                s,
                duration_s,
                run_now,
                prefect_port,
                os.environ.get("PREFECT_API_URL"),
                prefect_db,
                work_pool,
            )
        )
    except KeyboardInterrupt:
        return
    except (ConnectionError, ValueError, TimeoutError, RuntimeError) as exc:
        _fail(str(exc))
    if as_json:
        import dataclasses
        import json

        print(json.dumps([dataclasses.asdict(r) for r in served], indent=2))
        return
    table = Table(title=f"campaign {campaign.campaign}: flow runs its deployments made")
    for col in ("deployment", "flow run", "state", "expected start (UTC)"):
        table.add_column(col, overflow="fold")
    for r in served:
        table.add_row(r.deployment, r.flow_run, r.state, r.expected_start)
    console.print(table)


async def _serve(
    file,
    campaign,
    s: Settings,
    duration_s,
    run_now,
    prefect_port,
    api_url,
    prefect_db=None,
    work_pool=None,
):
    from labtwin.cli.wiring import LocalLab
    from labtwin.data.store import DEFAULT_SQLITE
    from labtwin.orchestration.campaign import channels_of
    from labtwin.orchestration.campaign_flow import serve_campaign
    from labtwin.orchestration.prefect_server import LocalPrefectServer

    config, broker_url = s.lab_config, s.connection("orchestrator")
    # Deployments run in other processes (other working directories): a relative SQLite path is made absolute.
    store_url = s.store if "://" in s.store else str(Path(s.store).resolve())
    async with contextlib.AsyncExitStack() as stack:
        if not api_url:
            server = await stack.enter_async_context(
                LocalPrefectServer(DEFAULT_SQLITE.parent / "prefect", prefect_port, database_url=prefect_db)
            )
            err.print(
                f"Prefect server (UI and API) at {server.api_url.removesuffix('/api')}; "
                f"its log in {server.home / 'server.log'}"
            )
        else:
            err.print(f"deployments go to the Prefect server at {api_url}")
        if broker_url is None:
            local = await stack.enter_async_context(
                LocalLab(config, channels_of(campaign), None, store_url, s.speed_value)
            )
            broker_url = local.url
        schedule = ", ".join(
            f"{e.protocol} on {', '.join(e.cells)} every {e.every or e.cron}" for e in campaign.schedule
        )
        where = f"; work pool {work_pool} runs them (`prefect worker start --pool {work_pool}`)" if work_pool else ""
        err.print(f"serving campaign {campaign.campaign} ({schedule or 'no schedule'}){where}; Ctrl-C stops")
        # The deployments' store_url has no password; the Runner's flow-run processes inherit LABTWIN_STORE.
        stack.enter_context(_store_secret_for_flows(store_url))
        return await serve_campaign(
            str(file),
            broker_url,
            config.lab,
            store_url,
            run_now,
            duration_s,
            work_pool=work_pool,
            lab_file=str(s.lab_file.resolve()),
        )


@campaign_app.command("status")
def status(
    file: Path = typer.Argument(..., help="campaign file"),
    lab: Path | None = LabOpt,
    store: str | None = StoreOpt,
) -> None:
    """Each job: queued, in progress (or interrupted: `campaign run` resumes it), or finished, from the store."""
    from labtwin.cli.wiring import open_store
    from labtwin.orchestration.campaign import plan
    from labtwin.orchestration.resume import read_run

    campaign, settings = _load(file, lab=lab, store=store)
    s = open_store(settings.store)
    table = Table(title=f"campaign {campaign.campaign}")
    for col in ("run", "cell", "protocol", "channel", "state", "steps done", "samples"):
        table.add_column(col, overflow="fold")
    counts: dict[str, int] = {}
    try:
        for job in plan(campaign):
            record = read_run(s, job.run_id)
            if record.state == "new":
                state, done, samples = "queued", "", ""
            elif record.state == "finished":
                state = f"finished: {record.exit_status}"
                done, samples = str(len(s.step_events(job.run_id))), str(s.sample_count(job.run_id))
            elif record.resume is not None:
                state = "in progress, or interrupted (campaign run resumes it)"
                done, samples = str(len(record.resume.completed)), str(record.resume.point.n_samples)
            else:
                state, done, samples = "in progress, or interrupted (campaign run resumes it)", "", ""
            counts[state.split(":")[0].split(",")[0]] = counts.get(state.split(":")[0].split(",")[0], 0) + 1
            table.add_row(job.run_id, job.cell.id, job.protocol, job.channel, state, done, samples)
        # Occurrences of the schedule (`campaign serve`) have run ids made from their scheduled time.
        import re

        cells = "|".join(re.escape(c.id) for c in campaign.cells)
        scheduled = re.compile(rf"^{re.escape(campaign.campaign)}-({cells})-s(\d+)-")
        for row in s.runs():
            m = scheduled.match(row.run_id)
            if not m:
                continue
            state = (
                f"scheduled, finished: {row.exit_status}" if row.stopped_at else "scheduled, in progress or interrupted"
            )
            counts["scheduled"] = counts.get("scheduled", 0) + 1
            table.add_row(
                row.run_id, m.group(1), row.protocol or "", row.channel or "", state, "", str(row.stored_samples)
            )
    finally:
        s.close()
    console.print(table)
    console.print(", ".join(f"{n} {k}" for k, n in counts.items()))
