"""`labtwin db`: the store's schema version, and migrating a store this labtwin did not open itself.

`Store.open` migrates a writable store on its own; these commands are for the cases it refuses (a store opened
read-only, or one an administrator upgrades before the lab's services start) and for asking which schema a
store holds without changing it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from labtwin.cli.options import JsonOpt, LabOpt, StoreOpt

db_app = typer.Typer(help="the store's schema version and migrations", no_args_is_help=True)


@db_app.command("current")
def db_current(store: str | None = StoreOpt, lab: Path | None = LabOpt, as_json: bool = JsonOpt) -> None:
    """The store's schema version, and the newest this labtwin knows; changes nothing."""
    from labtwin.cli import _print_json, console, settings
    from labtwin.data import migrate
    from labtwin.data.engine import describe_url

    url = settings(lab=lab, store=store).store
    found, head = migrate.current(url), migrate.head_version()
    if as_json:
        _print_json({"store": describe_url(url), "schema_version": found, "newest_known": head})
        return
    state = "empty (no labtwin tables yet)" if found is None else f"schema {found}"
    note = "" if found in (None, head) else f"; `labtwin db upgrade` migrates it to {head}"
    console.print(f"{describe_url(url)}: {state} (this labtwin writes schema {head}){note}")


@db_app.command("upgrade")
def db_upgrade(store: str | None = StoreOpt, lab: Path | None = LabOpt, as_json: bool = JsonOpt) -> None:
    """Migrate the store to the newest schema (creating its tables when it is empty)."""
    from labtwin.cli import _print_json, console, settings
    from labtwin.data import migrate
    from labtwin.data.engine import describe_url

    url = settings(lab=lab, store=store).store
    before, after = migrate.upgrade(url)
    if as_json:
        _print_json({"store": describe_url(url), "from": before, "to": after})
    elif before == after:
        console.print(f"{describe_url(url)}: already at schema {after}")
    else:
        console.print(f"{describe_url(url)}: schema {'(empty)' if before is None else before} -> {after}")
