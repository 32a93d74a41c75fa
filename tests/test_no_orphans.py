"""No orphans (issue 14): every process a labtwin command starts ends with it, SIGKILL included.

Each test starts a labtwin command that starts Prefect (its local server, or Prefect's ephemeral API) in a session
of its own, waits until that server answers, SIGKILLs the labtwin process alone (not its group: a power cut or the
OOM killer takes one process), and then finds, within a few seconds, no process of its former family or process
group alive (the leash, labtwin/orchestration/leash.py, ADR 0010). Two fast tests check the leash itself."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from labtwin.orchestration import leash
from tests import leftovers

LABTWIN = str(Path(sys.executable).parent / "labtwin")
ENDED_WITHIN_S = 15.0  # the leash polls every 0.25 s, then SIGTERM and at most 5 s to SIGKILL


def _answers(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


class Family:
    """A labtwin process started in its own session, and every process seen under it or in its group."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        env["PREFECT_HOME"] = str(cwd / "prefect-home")
        self.log = cwd / "labtwin.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.seen: dict[int, psutil.Process] = {}

    def look(self) -> list[psutil.Process]:
        """The family now (its descendants and its process group), remembered for after the kill."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter():
            try:
                if proc.pid != self.proc.pid and os.getpgid(proc.pid) == self.proc.pid:
                    self.seen.setdefault(proc.pid, proc)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return [p for p in self.seen.values() if _alive(p)]

    def wait_until(self, what: str, ready: Callable[[list[psutil.Process]], bool], timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready(self.look()):
            if self.proc.poll() is not None:
                pytest.fail(f"labtwin exited ({self.proc.returncode}) before {what}: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout_s:.0f} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)

    def kill_labtwin_only(self) -> list[psutil.Process]:
        """SIGKILL the labtwin process alone; the family members still alive ``ENDED_WITHIN_S`` later."""
        family = self.look()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        _, alive = psutil.wait_procs(family, timeout=ENDED_WITHIN_S)
        return [p for p in alive if _alive(p)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        leftovers.kill([p for p in self.seen.values() if _alive(p)])


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _port_of(proc: psutil.Process) -> int | None:
    args = _cmdline(proc).split()
    return int(args[args.index("--port") + 1]) if "--port" in args else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_file(tmp_path: Path, speed: str) -> Path:
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        yaml.safe_dump(
            {
                "lab": f"orphans{os.getpid()}",
                "channels": {
                    "a1": {
                        "driver": "simulated",
                        "cell": "lto_bare_thinfilm",
                        "speed": speed,
                        "limits": {"voltage_min_V": 0.1, "voltage_max_V": 3.5},
                    }
                },
            }
        )
    )
    return lab


def _report(left: list[psutil.Process]) -> str:
    return "still running after labtwin was SIGKILLed:\n  " + "\n  ".join(leftovers.describe(p) for p in left)


@pytest.mark.slow
def test_a_sigkilled_campaign_serve_takes_its_prefect_server_and_flow_runs_with_it(tmp_path):
    lab = _lab_file(tmp_path, "max")
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "campaign": "orphans",
                "lab": str(lab),
                "cells": [
                    {"id": "LTO-1", "channels": ["a1"], "protocols": ["eis-checkup"], "nominal_capacity_Ah": 5.18e-5}
                ],
                "schedule": [{"protocol": "eis-checkup", "cells": ["LTO-1"], "every": "4s"}],
            }
        )
    )
    port = _free_port()
    family = Family(
        [LABTWIN, "campaign", "serve", str(campaign), "--for", "60s", "--prefect-port", str(port)], tmp_path
    )
    try:
        family.wait_until("Prefect server answering", lambda _: _answers(f"http://127.0.0.1:{port}/api"))
        # and a flow run in progress: the Runner's flow-run process (multiprocessing spawn) is a child too
        family.wait_until("flow-run process", lambda procs: any("spawn_main" in _cmdline(p) for p in procs))
        # Killed at once: the flow-run process is still importing Prefect, long before the flow's own first line
        # (the window in which it used to outlive its Runner, retrying the dead API, with the resource tracker).
        servers = [_cmdline(p) for p in family.look() if "server start" in _cmdline(p)]
        spawned = [_cmdline(p) for p in family.look() if "multiprocessing" in _cmdline(p)]
        left = family.kill_labtwin_only()
        assert left == [], _report(left)
        assert servers and all("labtwin.orchestration.leash" in c for c in servers)
        assert spawned and all("labtwin.orchestration.leash" in c for c in spawned), spawned
        assert not _answers(f"http://127.0.0.1:{port}/api")
    finally:
        family.close()


@pytest.mark.slow
def test_a_sigkilled_run_takes_prefects_ephemeral_api_with_it(tmp_path):
    lab = _lab_file(tmp_path, "1")  # real time: the run lasts hours, so labtwin is mid-run when it is killed
    family = Family(
        [LABTWIN, "run", "lto_formation", "--channel", "a1", "--lab", str(lab), "--store", str(tmp_path / "s.db")],
        tmp_path,
    )

    def api_answers(procs: list[psutil.Process]) -> bool:
        ports = [_port_of(p) for p in procs if "uvicorn" in _cmdline(p)]
        return any(port is not None and _answers(f"http://127.0.0.1:{port}/api") for port in ports)

    try:
        family.wait_until("ephemeral Prefect API answering", api_answers)
        time.sleep(3.0)  # the run has started its flow
        apis = [_cmdline(p) for p in family.look() if "uvicorn" in _cmdline(p)]
        left = family.kill_labtwin_only()
        assert left == [], _report(left)
        assert apis and all("labtwin.orchestration.leash" in c for c in apis)
    finally:
        family.close()


# A parent that starts a leashed sleeper (a script, as `prefect server start` is), prints its pid, then sleeps.
PARENT = """
import subprocess, sys, time
from labtwin.orchestration.leash import leashed
child = subprocess.Popen(leashed([sys.executable, sys.argv[1]]))
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_leashed_child_ends_when_its_parent_is_sigkilled(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(120)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(sleeper)], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    child: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)
        assert _alive(child) and "sleeper.py" in _cmdline(child)
        parent.kill()
        parent.wait(10)
        started = time.monotonic()
        child.wait(ENDED_WITHIN_S)  # SIGTERM ends a plain sleeper at once: the leash fired
        # Before the leash's SIGKILL would have come (GRACE_S after its SIGTERM): it was the SIGTERM that ended it.
        # Not a tighter bound: on a loaded CI machine the poll and the child's exit took just over 2 s.
        assert time.monotonic() - started < leash.GRACE_S
    finally:
        parent.kill()
        parent.wait(10)
        leftovers.kill([child] if child is not None and _alive(child) else [])


def test_a_leashed_program_whose_parent_has_gone_does_not_start(tmp_path):
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("print('started')\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(10)
    done = subprocess.run(
        [sys.executable, "-m", "labtwin.orchestration.leash", str(gone.pid), str(sleeper)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1 and "started" not in done.stdout
    assert f"parent {gone.pid} has gone" in done.stderr
