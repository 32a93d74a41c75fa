"""A new Prefect database in milliseconds: a copy of one that Prefect's own migrations built once (ADR 0019).

Prefect creates its SQLite database by running its whole Alembic history (~150 revisions) on every new
PREFECT_HOME: 9 s on an idle core here, 19 s on a loaded one, paid by the first `labtwin demo` on a machine,
by every `campaign serve` of a new lab directory and by every test with its own PREFECT_HOME. The result is
the same file each time (the schema and its ``alembic_version`` row, nothing else), so labtwin builds it once
per Prefect version with ``prefect server database upgrade`` into a cache directory and copies it where a new
database would be created. An existing database is never touched: Prefect migrates it on start as it always
does, and a template of another Prefect version is never used (the version is in its name).

``python -m labtwin.orchestration.prefect_template`` builds the template (``make install`` runs it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

SQLITE_PREFIXES = ("sqlite+aiosqlite:///", "sqlite:///")
BUILD_TIMEOUT_S = 600.0


def cache_dir() -> Path:
    """``LABTWIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/labtwin`` (``~/.cache/labtwin``)."""
    given = os.environ.get("LABTWIN_CACHE_DIR")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labtwin"


def template_path() -> Path:
    from importlib.metadata import version

    return cache_dir() / f"prefect-{version('prefect')}.db"


def sqlite_file(connection_url: str) -> Path | None:
    """The file of a SQLite connection URL; None for another database or an in-memory one."""
    for prefix in SQLITE_PREFIXES:
        if connection_url.startswith(prefix):
            path = connection_url[len(prefix) :].split("?", 1)[0]
            if not path or path.startswith(":memory:") or path.startswith("file:"):
                return None
            return Path(path)
    return None


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """One builder at a time across processes (a test suite's workers start together)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: concurrent builders only waste time
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_template() -> Path | None:
    """The migrated template of the installed Prefect version, built by Prefect if not there yet; None when
    it cannot be built (Prefect then migrates each new database itself, as without labtwin)."""
    template = template_path()
    if template.exists():
        return template
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
    if prefect is None:
        return None
    try:
        with _locked(template.with_suffix(".lock")):
            if template.exists():  # built by another process while this one waited
                return template
            with tempfile.TemporaryDirectory(dir=template.parent, prefix=".building-") as building:
                database = Path(building) / "prefect.db"
                env = {
                    **os.environ,
                    "PREFECT_HOME": building,
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "DO_NOT_TRACK": "1",
                }
                env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
                env.pop("PREFECT_PROFILE", None)
                done = subprocess.run(
                    [prefect, "server", "database", "upgrade", "-y"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT_S,
                )
                if done.returncode != 0 or not database.exists():
                    log.warning("could not build Prefect's database template: %s", done.stderr.strip()[-500:])
                    return None
                os.replace(database, template)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not build Prefect's database template in %s: %s", template.parent, exc)
        return None
    return template


def seed_database(connection_url: str) -> bool:
    """Copy the template where Prefect would create a new SQLite database; True when it did.

    Nothing happens for an existing database, PostgreSQL or an in-memory one."""
    target = sqlite_file(connection_url)
    if target is None or (target.exists() and target.stat().st_size > 0):
        return False
    template = build_template()
    if template is None:
        return False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.seeding")
        shutil.copyfile(template, partial)
        if target.exists() and target.stat().st_size > 0:  # another process got there first: its file stands
            partial.unlink()
            return False
        os.replace(partial, target)
    except OSError as exc:
        log.warning("could not copy Prefect's database template to %s: %s", target, exc)
        return False
    return True


def main() -> int:
    template = build_template()
    if template is None:
        print("Prefect's database template could not be built: each new Prefect database migrates itself")
        return 1
    print(f"Prefect's database template: {template}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
