"""How a user's mistake reaches the user: one line on stderr and a non-zero exit, never a traceback.

The one handler is ``LabtwinGroup.invoke``, around every command. It knows labtwin's own error types (and
the few built-in ones labtwin raises with a message meant for the user, such as a broker that does not
answer); anything else is a bug and keeps its traceback. Exit codes, the same for every command:

- 0: done; for ``run`` and ``campaign run``: every run ended ``success``; for ``dryrun``: not ``failed``;
- 1: the command worked but the run ended failed (``run``, ``campaign run``: or aborted), or
  ``protocol check`` refused the protocol;
- 2: a user error: a file, flag or setting that cannot work, a channel nobody serves, a store that cannot
  be written;
- 3: refused: the broker or the channel's agent did not accept a command (``pause``, ``resume``, ``stop``:
  credentials or ACL without the right, an unsigned or wrongly signed command, no agent acknowledged it);
- 130: interrupted by Ctrl-C (a run in progress is stopped and marked interrupted first).

Under ``labtwin agent --supervise`` (the child has LABTWIN_SUPERVISED set) a user error that no restart can
cure (a lab file, a spool another agent holds) exits 78 (EX_CONFIG of sysexits, what systemd's
RestartPreventExitStatus is usually given) instead of 2, and the supervisor stops there; an unreachable broker or
instrument stays 2 and is tried again: it may be back at the next start.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
import typer.core

from labtwin.security.redact import redact

EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130
EXIT_CONFIG = 78
SUPERVISED_ENV = "LABTWIN_SUPERVISED"
CURABLE_BY_RESTART = frozenset({"BrokerUnreachable", "InstrumentError"})
"""User errors that may be gone at the next start: a broker or an instrument not (yet) answering."""


class UserError(Exception):
    """Something the user can fix; the message names the file, flag or field and says how."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _user_error_types() -> tuple[type[BaseException], ...]:
    """labtwin's error types whose messages are written for the user.

    Modules are looked up only if already imported: an error of a module never imported cannot be raised,
    and importing the orchestration room here would start Prefect for ``labtwin --version``. The lab file's
    and the protocol's modules too: a command's ``--help`` ends in click's Exit, which passes through here,
    and importing them would load the lab, alert and document models (pydantic, httpx) for it.
    """
    found: list[type[BaseException]] = [UserError]
    for module, names in (
        ("labtwin.config.lab", ("LabConfigError",)),
        ("labtwin.protocols.model", ("ProtocolError",)),
        ("labtwin.protocols.strings", ("StepStringError",)),
        ("labtwin.physics.library", ("CellFileError",)),
        ("labtwin.bus.client", ("BrokerUnreachable",)),
        ("labtwin.bus.sessions", ("SessionInUse",)),  # another recorder/twin of this lab runs from this directory
        ("labtwin.security.profile", ("SecurityProfileError",)),
        ("labtwin.instruments.transport", ("InstrumentError",)),  # off, unplugged, wrong address, its own error
        ("labtwin.agent.spool", ("SpoolBusy",)),  # another agent of this channel holds its spool
        ("labtwin.data.store", ("StoreError",)),
        ("labtwin.data.engine", ("StoreURLError",)),
        ("labtwin.data.migrate", ("StoreError",)),
        ("labtwin.orchestration.flows", ("ChannelUnavailable", "StepTimeout")),
        ("labtwin.formats.recording", ("RecordingError",)),
        ("labtwin.analysis.eis", ("SpectrumFileError", "CircuitError")),
    ):
        loaded = sys.modules.get(module)
        for name in names:
            cls = getattr(loaded, name, None) if loaded is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def one_line(message: str) -> str:
    """A message on one line; a list of mistakes (each line naming its file) stays one line per mistake."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1:
        head = lines[0].split(":", 1)[0] + ":"
        if all(line.startswith(head) for line in lines):
            return "\n".join(f"error: {line}" if i else line for i, line in enumerate(lines))
    return " ".join(message.split())


def report(message: str) -> None:
    # Plain text, not rich: rich wraps at the terminal's width and reads "[0]" in a field path as markup.
    typer.echo(f"error: {redact(one_line(message))}", err=True)


def store_error(url: str, exc: BaseException) -> UserError:
    """A store that cannot be opened or written: which one, what the database said, what to do."""
    return UserError(
        f"store {url}: {exc}. Give a writable SQLite path or a reachable postgresql:// URL "
        "(--store, LABTWIN_STORE or the lab file's store:)"
    )


def is_store_error(exc: BaseException) -> bool:
    """An error of the database or its file (SQLite, PostgreSQL, SQLAlchemy), not of labtwin's code; asked
    only about what ``Store.open`` raised."""
    import sqlite3  # here: every command imports this module, only a store's failure needs sqlite3

    if isinstance(exc, sqlite3.Error | OSError):  # OSError: its directory cannot be made, a path through a file
        return True
    module = type(exc).__module__ or ""
    if module.startswith("labtwin.data") and type(exc).__name__ == "StoreError":
        return True  # the store's own refusal (a schema it cannot migrate, a file it cannot open)
    return module.startswith(("sqlalchemy.exc", "psycopg", "alembic"))


class LabtwinGroup(typer.core.TyperGroup):
    """The root command group: every command runs inside its ``invoke``, the one place errors become lines."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo("interrupted (Ctrl-C)", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if isinstance(exc, UserError):
                report(str(exc))
                raise typer.Exit(_supervised_code(exc, exc.exit_code)) from None
            if isinstance(exc, _user_error_types()):
                report(str(exc))
                raise typer.Exit(_supervised_code(exc, EXIT_USER_ERROR)) from None
            raise


def _supervised_code(exc: BaseException, code: int) -> int:
    """The exit code; under a supervisor, EXIT_CONFIG for a user error a restart cannot cure."""
    if code != EXIT_USER_ERROR or not os.environ.get(SUPERVISED_ENV):
        return code
    names = {cls.__name__ for cls in type(exc).__mro__}  # InstrumentTimeout is an InstrumentError too
    curable = bool(names & CURABLE_BY_RESTART) and "BrokerRefused" not in names  # wrong credentials stay wrong
    return code if curable else EXIT_CONFIG
