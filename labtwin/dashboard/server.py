"""Serving the dashboard with uvicorn, inside the caller's event loop (``labtwin dashboard``, ``labtwin demo``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from labtwin.dashboard.app import DashboardConfig, create_app
from labtwin.security.connection import is_loopback

log = logging.getLogger(__name__)


class _QuietServer(uvicorn.Server):
    """uvicorn leaves the process's signals alone: the command (or the demo) it runs in owns Ctrl-C."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DashboardServer:
    """The app on a socket this object binds first, so a port in use is an error at start, not a log line."""

    def __init__(self, config: DashboardConfig, tls_cert: Path | None = None, tls_key: Path | None = None) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both or neither")
        config.tls = tls_cert is not None
        self.config = config
        self.app = create_app(config)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: without it, the second request on a kept-alive connection
        # waited 40 ms (Nagle's algorithm against the browser's delayed ACK), on every API call of a page.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._socket.bind((config.host, config.port))
        except OSError as exc:
            self._socket.close()
            raise OSError(
                f"dashboard cannot listen on {config.host}:{config.port}: {exc.strerror}; choose another --port"
            ) from None
        self.port = self._socket.getsockname()[1]
        self._uvicorn = _QuietServer(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                ssl_certfile=str(tls_cert) if tls_cert else None,
                ssl_keyfile=str(tls_key) if tls_key else None,
                lifespan="off",  # the app's start and stop are called here (labtwin.dashboard.app)
                timeout_graceful_shutdown=2,
            )
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = self.config.host
        # Listening on every address: this machine's loopback is one of them (others: its network address).
        shown = (
            "127.0.0.1"
            if host in ("0.0.0.0", "")
            else ("[::1]" if host == "::" else (f"[{host}]" if ":" in host else host))
        )
        return f"{scheme}://{shown}:{self.port}/"

    @property
    def listening(self) -> str:
        """Where it listens, as a user reads it: every address, or the one given."""
        host = self.config.host
        if host in ("0.0.0.0", "", "::"):
            return f"every address of this machine, port {self.port} (from elsewhere: http(s)://<this machine>:{self.port}/)"
        return f"{host}:{self.port}"

    @property
    def warning(self) -> str | None:
        if not is_loopback(self.config.host) and not self.config.tls:
            return (
                f"the dashboard listens on {self.config.host} without TLS: anyone on the network may view it and "
                "operator actions are off; give --tls-cert/--tls-key"
            )
        if not is_loopback(self.config.host) and not (self.config.sessions and self.config.sessions.logins_required):
            return "the dashboard listens beyond loopback without logins: give --users FILE"
        return None

    async def start(self) -> None:
        await self.app.state.start()
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self._socket]), name="dashboard-http")
        for _ in range(200):
            if self._uvicorn.started or self._task.done():
                break
            await asyncio.sleep(0.025)
        if self._task.done():
            self._task.result()

    async def serve_forever(self) -> None:
        if self._task is None:
            await self.start()
        assert self._task is not None
        await self._task

    async def stop(self) -> None:
        self._uvicorn.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        await self.app.state.stop()
        self._socket.close()
