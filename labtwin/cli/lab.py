"""`labtwin lab secure LABFILE --out DIR`: the files a lab needs to run on a secured Mosquitto.

The work is labtwin.config.secure_lab's; this prints what was written and the commands that come next,
one per line, so they can be copied (never wrapped, never the secrets themselves).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from labtwin.cli.errors import UserError

lab_app = typer.Typer(
    help="Set a lab up: its security (certificates, passwords, ACLs, signing keys).", no_args_is_help=True
)


@lab_app.callback()
def _lab() -> None:
    """Set a lab up: its security (certificates, passwords, ACLs, signing keys)."""


@lab_app.command("secure")
def secure(
    lab_file: Path = typer.Argument(..., help="the lab file whose channels get an agent identity each"),
    out: Path = typer.Option(..., "--out", help="new or empty directory for the CA, certificates, keys and configs"),
    hosts: list[str] = typer.Option(
        [], "--host", help="name or address the broker is reached at (repeat; default localhost and 127.0.0.1)"
    ),
    days: int = typer.Option(825, "--days", help="validity of the CA and every certificate, in days"),
    mtls: bool = typer.Option(False, "--mtls", help="the broker requires every client's certificate (mutual TLS)"),
    port: int = typer.Option(8883, "--port", min=1, max=65535, help="the broker's TLS port (listener and broker: URL)"),
    force: bool = typer.Option(False, "--force", help="overwrite the files of a non-empty --out"),
) -> None:
    """Write a CA, server and client certificates, passwords, signing keys, Mosquitto's passwd, acl and conf."""
    from labtwin.config.lab import LabConfigError
    from labtwin.config.secure_lab import SecureLabError, secure_lab

    if not lab_file.is_file():
        raise UserError(
            f"lab file {lab_file}: {'is a directory' if lab_file.is_dir() else 'does not exist'}; give a YAML lab file"
        )
    started = time.perf_counter()
    try:
        result = secure_lab(lab_file, out, hosts or None, days, force, mtls=mtls, port=port)
    except (SecureLabError, LabConfigError) as exc:
        raise UserError(str(exc)) from None
    took_s = time.perf_counter() - started
    o = result.out.resolve()
    agents = [i for i in result.identities if i.channel is not None]
    typer.echo(
        f"secured lab {result.lab} in {o} ({len(result.files)} files, {took_s:.2f} s, passwd by {result.passwd_tool}):"
    )
    typer.echo(f"  broker:   {o / 'mosquitto.conf'}  {o / 'passwd'}  {o / 'acl'}  ca.crt server.crt server.key")
    typer.echo(
        f"  profile:  {o / 'security.yaml'} ({len(result.identities)} identities: {', '.join(i.name for i in result.identities)})"
    )
    typer.echo(f"  lab file: {o / 'lab.yaml'} (broker: {result.broker}, security: security.yaml)")
    typer.echo(f"  which machine needs which file: {o / 'README.txt'}")
    typer.echo("next:")
    if os.geteuid() == 0:  # Mosquitto started as root reads its files as user mosquitto
        typer.echo(f"  chown mosquitto {o / 'server.key'} {o / 'passwd'} {o / 'acl'}")
    typer.echo(f"  mosquitto -c {o / 'mosquitto.conf'}")
    typer.echo(
        f"  labtwin monitor --lab {o / 'lab.yaml'} --seconds 10   # as the viewer: no password on a command line"
    )
    for ident in agents:
        typer.echo(f"  labtwin agent --channel {ident.channel} --lab {o / 'lab.yaml'}")
