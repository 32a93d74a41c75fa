"""`labtwin alerts`: send a test message to every destination of the lab file's ``alerts:``, or run the service.

``test`` is what a lab runs after writing its ``alerts:`` section: one message per destination, and per
destination ``ok`` or the one-line reason it failed; exit 1 if any failed, so a script or CI sees it. ``watch``
follows the lab on the broker as a viewer and sends what the rules fire until Ctrl-C (docs/alerts.md).
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import typer

from labtwin.cli.errors import EXIT_RUN_FAILED, UserError
from labtwin.cli.options import BrokerOpt, JsonOpt, LabOpt

alerts_app = typer.Typer(
    help="alerts to webhooks and e-mail: send a test message, or run the service", no_args_is_help=True
)


def _alerts_config(lab: Path | None, broker: str | None = None):
    """The settings and the lab file, which must have an ``alerts:`` section with a destination."""
    from labtwin.cli import settings

    s = settings(lab=lab, broker=broker)
    config = s.lab_config
    if config.alerts is None or not config.alerts.destinations:
        raise UserError(
            f"{s.lab_file}: alerts.destinations: none configured; add an alerts: section with destinations "
            "(docs/alerts.md)"
        )
    return s, config


def _cells_by_channel(config) -> dict[str, str]:
    return {name: ch.cell_id for name, ch in config.channels.items() if ch.cell_id}


async def _send_test(config, lab: str) -> dict[str, str | None]:
    import asyncio

    from labtwin.alerts import Alert, make_sender, run_link

    assert config.alerts is not None
    alert = Alert(
        lab=lab,
        cell="test-cell",
        kind="test",
        rule="labtwin alerts test",
        message=f"a test message from `labtwin alerts test` for lab {lab}: this destination works",
        link=run_link(config.alerts.dashboard_url, ""),
    )
    senders = {name: make_sender(name, dest) for name, dest in config.alerts.destinations.items()}

    async def one(sender) -> str | None:
        from labtwin.alerts import SendError

        try:
            await sender.send(alert)
        except SendError as exc:
            return str(exc)
        return None

    results = await asyncio.gather(*(one(s) for s in senders.values()))
    return dict(zip(senders, results))


@alerts_app.command("test")
def alerts_test(lab: Path | None = LabOpt, as_json: bool = JsonOpt) -> None:
    """Send one test message to every configured destination; exit 1 if any did not take it."""
    import asyncio

    from labtwin.cli import _print_json, console

    s, config = _alerts_config(lab)
    results = asyncio.run(_send_test(config, config.lab))
    if as_json:
        _print_json({name: {"ok": error is None, "error": error} for name, error in results.items()})
    else:
        for name, error in results.items():
            dest = config.alerts.destinations[name]
            console.print(
                f"{name} ({dest.type}): " + ("ok" if error is None else f"FAILED: {error}"),
                markup=False,
                soft_wrap=True,
            )
    failed = [name for name, error in results.items() if error is not None]
    if failed:
        if not as_json:
            typer.echo(f"error: {len(failed)} of {len(results)} destinations failed: {', '.join(failed)}", err=True)
        raise typer.Exit(EXIT_RUN_FAILED)


@alerts_app.command("watch")
def alerts_watch(
    lab: Path | None = LabOpt,
    broker: str | None = BrokerOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Follow the lab on the broker and send the alerts its rules fire (Ctrl-C stops)."""
    import asyncio

    from labtwin.alerts import AlertService
    from labtwin.cli import _needs_broker, _setup_logging, console, err

    _setup_logging(verbose)
    s, config = _alerts_config(lab, broker)
    url = _needs_broker(s, "alerts watch", "viewer")
    assert config.alerts is not None
    service = AlertService(url, config.alerts, config.lab, _cells_by_channel(config))
    names = ", ".join(f"{n} ({d.type})" for n, d in config.alerts.destinations.items())
    err.print(f"alerts for lab {config.lab} from {url} to {names}; {len(config.alerts.rules)} rules; Ctrl-C stops")
    service.feed.subscribe(lambda a: console.print(f"alert {a.kind} on {a.cell or '?'}: {a.message}", markup=False))

    async def _serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            loop.add_signal_handler(signal.SIGINT, stop.set)
        await service.serve(stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve())
