"""labtwin commands as a lab runs them, each a process of its own that a fault test kills and starts again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from labtwin.data.store import Store

LABTWIN = str(Path(sys.executable).parent / "labtwin")


class Service:
    """A labtwin command in a process group of its own, killed and started again by pid."""

    def __init__(self, name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.name, self.args, self.cwd, self.env = name, args, cwd, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Service:
        log = open(self.cwd / f"{self.name}.{self.starts}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.starts += 1
        return self

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.cwd.glob(f"{self.name}.*.log")))


def run_started(store_path: Path) -> str | None:
    if not store_path.exists():
        return None
    try:  # the recorder may not have made its tables yet
        store = Store.open(store_path, read_only=True)
    except Exception:
        return None
    try:
        runs = store.runs()
        return runs[0].run_id if runs else None
    except Exception:
        return None
    finally:
        store.close()
