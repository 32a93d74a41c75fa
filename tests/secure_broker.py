"""A real Mosquitto with the files `labtwin lab secure` wrote: its own port, config and log, stopped by pid.

The generated mosquitto.conf fragment is used as written, with three test-only changes: its ``listener 8883``
becomes ``listener <free port> 127.0.0.1`` (traffic stays on loopback, runs in parallel do not collide), the log
goes to a file in the test's directory, and nothing persists. Started as root, Mosquitto would drop to user
mosquitto and fail to read the 0600 files the test made, so it is told to stay the user who runs the tests.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

MOSQUITTO = "/usr/sbin/mosquitto"


def mosquitto_binary() -> str:
    """The broker to start, or the test is skipped (cleanly) where Mosquitto is not installed."""
    found = MOSQUITTO if os.access(MOSQUITTO, os.X_OK) else shutil.which("mosquitto")
    if not found:
        pytest.skip("Mosquitto is not installed (apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SecureBroker:
    """``with SecureBroker(out, workdir) as broker:`` Mosquitto on ``broker.port`` with ``out``'s TLS, passwd and acl."""

    host = "127.0.0.1"

    def __init__(self, out: Path, workdir: Path, password_file: Path | None = None, start_timeout_s: float = 10.0):
        self.out = Path(out)
        self.workdir = Path(workdir)
        self.password_file = password_file
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.log = self.workdir / "mosquitto.log"
        self.conf = self.workdir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    def config(self, port: int) -> str:
        fragment = (self.out / "mosquitto.conf").read_text(encoding="utf-8")
        text, n = re.subn(r"(?m)^listener 8883\s*$", f"listener {port} {self.host}", fragment)
        assert n == 1, f"{self.out / 'mosquitto.conf'} has no `listener 8883` line"
        if self.password_file is not None:
            text, n = re.subn(r"(?m)^password_file .*$", f"password_file {self.password_file.resolve()}", text)
            assert n == 1, "the fragment has no password_file line"
        return (
            text
            + f"\n# test-only\nuser {getpass.getuser()}\npersistence false\nlog_dest file {self.log}\n"
            + "log_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n"
        )

    def __enter__(self) -> SecureBroker:
        binary = mosquitto_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a free port can be taken between the probe and Mosquitto's bind: try another
            self.port = free_port()
            self.conf.write_text(self.config(self.port), encoding="utf-8")
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_accepting():
                return self
            self.stop()
            if "Address already in use" not in self.log_text():
                break
        raise RuntimeError(f"Mosquitto did not start with {self.conf}: {self.log_text()[-2000:]}")

    def _wait_accepting(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
