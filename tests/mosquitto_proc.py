"""A plain Mosquitto the test starts with its own config on a free loopback port, and kills or restarts by pid.

For fault tests: ``kill()`` is a power cut (SIGKILL), ``stop()`` a graceful shutdown (SIGINT, as an upgrade does),
``start()`` brings it back on the same port. With ``persistence=True`` it keeps sessions and retained messages
in the test's directory across a restart, as a lab's broker configured for it would; without, a restart forgets
every session. Its queue per client is raised from Mosquitto's default of 1000, as `labtwin lab secure` writes.
"""

from __future__ import annotations

import getpass
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.secure_broker import free_port, mosquitto_binary


class MosquittoProcess:
    host = "127.0.0.1"

    def __init__(self, workdir: Path, *, persistence: bool = False, start_timeout_s: float = 10.0) -> None:
        self.workdir = Path(workdir)
        self.persistence = persistence
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            f"user {getpass.getuser()}",
            "max_queued_messages 100000",
            "max_inflight_messages 64",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"persistence {'true' if self.persistence else 'false'}",
        ]
        if self.persistence:
            lines += [f"persistence_location {self.workdir}/", "autosave_interval 1"]
        return "\n".join(lines) + "\n"

    def start(self) -> MosquittoProcess:
        binary = mosquitto_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config(), encoding="utf-8")
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"Mosquitto did not start on port {self.port}: {self.log_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no goodbye to any client, nothing saved since the last autosave."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGINT: Mosquitto's own shutdown (it saves its persistence file and closes every connection)."""
        self._end(signal.SIGINT)

    def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
