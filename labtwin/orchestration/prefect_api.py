"""labtwin's own start of Prefect's local API, for a process that has no PREFECT_API_URL (ADR 0019).

Prefect starts a temporary server on its first client when no API is configured: it imports its whole
server application into the calling process to build the server object (2-3 s here), starts
``uvicorn ... prefect.server.api.server:create_app`` in a subprocess, waits for it by blocking the event loop,
and the server runs Prefect's ~150 Alembic migrations into a new database on every fresh PREFECT_HOME
(9-19 s here). labtwin starts the same application the same way (Prefect's factory, its settings, its
database), with three differences:

- the database: a new SQLite file is copied from a migrated template (``prefect_template``), built once per
  Prefect version by Prefect's own ``prefect server database upgrade``; an existing database is Prefect's to
  migrate, as before;
- the subprocess is started on a leash (ADR 0010) and waited for without blocking the loop, so it can start
  while the broker and agents come up;
- this process imports no Prefect server code, only Prefect's settings.

Whatever is started is then an ordinary API URL (``PREFECT_API_URL``, inherited by children), so Prefect's
clients never start a second server of their own.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from labtwin.orchestration.leash import leashed
from labtwin.orchestration.prefect_template import seed_database

#: Environment Prefect's own temporary server is started with: no UI, the services of an ephemeral server.
EPHEMERAL_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
#: Prefect's application factory, with SQLite on one connection (labtwin.orchestration.prefect_api_server).
APP_FACTORY = "labtwin.orchestration.prefect_api_server:create_app"
#: uvicorn exits 3 when its port was taken between our check and its bind: try another one.
PORT_TAKEN_EXIT = 3
START_ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _log_path(settings: Any) -> Path:
    """``local-api.log`` in PREFECT_HOME (created if need be)."""
    home = Path(settings.home).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home / "local-api.log"


class EphemeralAPI:
    """One Prefect API server subprocess for this process, ended with it (atexit, and the leash on SIGKILL)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url: str | None = None
        self.log_path: Path | None = None
        self._ready = False

    def spawn(self) -> None:
        """Start the server subprocess (returns at once; ``wait_ready`` waits for it)."""
        from prefect.settings import get_current_settings

        settings = get_current_settings()
        database_url = settings.server.database.connection_url
        if database_url is not None:
            seed_database(database_url.get_secret_value())
        import prefect

        port = _free_port()
        env = {
            **os.environ,
            **EPHEMERAL_SERVER_ENV,
            **settings.to_environment_variables(exclude_unset=True),
        }
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent)]
        command += ["--factory", f"{APP_FACTORY}", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        # The server's own log lines go to a file beside its database, not into the command's output.
        self.log_path = _log_path(settings)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(leashed(command), env=env, stdout=log_file, stderr=subprocess.STDOUT)
        self.api_url = f"http://127.0.0.1:{port}/api"

    async def wait_ready(self, timeout_s: float) -> str:
        """The API's URL once it answers; set as this process's PREFECT_API_URL from then on."""
        assert self.process is not None and self.api_url is not None, "spawn() first"
        if self._ready:
            return self.api_url
        deadline = time.monotonic() + timeout_s
        attempts = 1
        while not await asyncio.to_thread(_healthy, self.api_url):
            code = self.process.poll()
            if code == PORT_TAKEN_EXIT and attempts < START_ATTEMPTS:
                attempts += 1
                self.spawn()
                continue
            if code is not None:
                raise RuntimeError(
                    f"Prefect's local API server exited with status {code} before it answered; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(
                    f"Prefect's local API server did not answer within {timeout_s:.0f} s "
                    f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); see {self.log_path}"
                )
            await asyncio.sleep(0.1)
        self._use(self.api_url)
        self._ready = True
        return self.api_url

    def _use(self, api_url: str) -> None:
        """Every Prefect client of this process, and every child it starts, talks to ``api_url``."""
        import prefect.context
        from prefect.settings import PREFECT_API_URL

        os.environ["PREFECT_API_URL"] = api_url
        prefect.context.refresh_global_settings_context()  # Prefect read its settings at import
        current = prefect.context.SettingsContext.get()
        if current is not None and current.settings.api.url != api_url:
            # A temporary settings context active in this task (e.g. --prefect-db's) shadows the global one.
            # Entered for the rest of the task and never exited: a context manager left open would be
            # finalised at exit in another context, which Prefect's token reset refuses.
            updated = current.settings.copy_with_update(updates={PREFECT_API_URL: api_url})
            prefect.context.SettingsContext(profile=current.profile, settings=updated).__enter__()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.api_url is not None and os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]


_api: EphemeralAPI | None = None


def local_api_url() -> str | None:
    """The URL of the local API this process started, if it did."""
    return _api.api_url if _api is not None else None


def configured_api_url() -> str | None:
    """The Prefect API this process was given (environment, profile, a test harness), if any."""
    from prefect.settings import PREFECT_API_URL

    return os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value() or None


def begin_ephemeral_api() -> EphemeralAPI | None:
    """Start the local API unless one is configured or already started; returns it (None: one is configured)."""
    global _api
    if _api is not None:
        return _api
    if configured_api_url():
        return None
    _api = EphemeralAPI()
    _api.spawn()
    atexit.register(_api.stop)
    return _api


async def ensure_prefect_api() -> str | None:
    """Prefect's API answers: the configured one, or the local one started (if need be) and waited for."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    api = begin_ephemeral_api()
    if api is None:
        return configured_api_url()
    return await api.wait_ready(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
