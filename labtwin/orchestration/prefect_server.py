"""A local Prefect server for `labtwin campaign serve` when no PREFECT_API_URL is configured.

Schedules need Prefect's scheduler service, which only a real API server runs
(the ephemeral in-process API that `labtwin run` uses has none: Prefect's
Runner warns "Cannot schedule flows on an ephemeral server"). So serving a
campaign on the embedded defaults starts `prefect server start` in a
subprocess, with its database under the lab's data directory so the
campaign's history (and the UI at its address) outlives the process.

Prefect's server on SQLite has one writer: its runner polls, state changes and
scheduler contend for it, and on a loaded two-core PC requests wait on "database
is locked" for tens of seconds (PrefectHQ/prefect#23051). SQLite is fine for a
few cells on a schedule of hours; a lab serving many cells gives the server its
PostgreSQL (`--prefect-db postgresql://...`).

Both servers labtwin starts, this one and Prefect's local API (labtwin.orchestration.prefect_api), run on a leash (labtwin.orchestration.leash):
they end when the labtwin process that started them ends, SIGKILL included (ADR 0010).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import BinaryIO

from labtwin.orchestration.leash import leashed

STARTUP_TIMEOUT_S = 90.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


IN_MEMORY = "sqlite+aiosqlite:///file::memory:?cache=shared&uri=true"


def prefect_database_url(url: str) -> str:
    """The URL as Prefect's server wants it: PostgreSQL through asyncpg, SQLite through aiosqlite; ``memory``
    for a database that lives as long as the server (Prefect keeps one connection to it, so its writers
    queue in the server instead of sleeping on SQLite's file lock)."""
    if url == "memory":
        return IN_MEMORY
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite:///", "sqlite+aiosqlite:///"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    if url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite:///")):
        return url
    raise ValueError(f"--prefect-db {url!r}: give memory, a postgresql://user@host:port/database URL or sqlite:///path")


@contextlib.contextmanager
def ephemeral_database(url: str | None):
    """Prefect's ephemeral API (the one `labtwin run` and `campaign run` start in a subprocess on first use)
    on this database; it must not have started yet in this process."""
    if not url:
        yield
        return
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings

    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: prefect_database_url(url)}):
        yield


class LocalPrefectServer:
    """`prefect server start` on 127.0.0.1; sets PREFECT_API_URL for this process and its children."""

    def __init__(self, home: Path, port: int = 4200, ui: bool = True, database_url: str | None = None) -> None:
        self.home = Path(home)
        self.database_url = prefect_database_url(database_url) if database_url else None
        self.port = port if _port_free(port) else _free_port()
        self.ui = ui
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._process: subprocess.Popen | None = None
        self._settings = contextlib.ExitStack()
        self._log: BinaryIO | None = None

    async def __aenter__(self) -> LocalPrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or shutil.which("prefect")
        if prefect is None:
            raise RuntimeError("the `prefect` command is not installed next to this Python: run `make install`")
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home.resolve()),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "true" if self.ui else "false",
        }
        env.pop("PREFECT_API_URL", None)
        if self.database_url:
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = self.database_url
        from labtwin.orchestration.prefect_template import seed_database

        seed_database(self.database_url or f"sqlite+aiosqlite:///{self.home.resolve() / 'prefect.db'}")
        self._log = open(self.home / "server.log", "ab")
        # Its own session, so a Ctrl-C in the terminal reaches labtwin only (which drains the runs through this
        # server before stopping it); on a leash, so it ends with labtwin however labtwin ends.
        self._process = subprocess.Popen(
            leashed([sys.executable, prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)]),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not await asyncio.to_thread(_healthy, self.api_url):
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited ({self._process.returncode}); see {self.home / 'server.log'}"
                )
            if time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise TimeoutError(
                    f"the Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s; see {self.home / 'server.log'}"
                )
            await asyncio.sleep(0.5)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = self.api_url  # children (the Runner's flow-run processes) inherit it
        self._settings.enter_context(temporary_settings(updates={PREFECT_API_URL: self.api_url}))
        return self

    async def __aexit__(self, *exc) -> None:
        self._settings.close()
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 20)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._log is not None:
            self._log.close()
