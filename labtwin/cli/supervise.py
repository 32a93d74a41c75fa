"""``labtwin agent --supervise``: the agent as a child process, started again whenever it dies.

Why in labtwin and not only in systemd: an agent killed mid-step (``kill -9``, the OOM killer, a crash in a
driver) left the instrument sourcing until someone restarted it by hand (issue 14: 1.2 mA on a 2450). Restarted,
the agent's first act is its instrument's safe state (Agent.serve), then it resumes the run from its spool.

The rules: a child that dies is started again after a back-off, 1 s doubling to 30 s, back to 1 s once a
child has run 60 s (healthy); SIGINT or SIGTERM to the supervisor stops the restarts and ends the child
(SIGTERM, SIGKILL after ``STOP_GRACE_S``); the child runs on the leash (labtwin.orchestration.leash, ADR 0010),
so a supervisor that is itself killed takes its child with it. A child that cannot start as configured (a lab
file it refuses, a spool another agent of the channel holds) exits EXIT_CONFIG (78, labtwin.cli.errors) and
the supervisor stops with it: restarting would only repeat the error every 30 s for ever. Any other end (a
crash, a kill, a broker or instrument not answering yet) is restarted, as systemd's ``Restart=always`` does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

from labtwin.cli.errors import EXIT_CONFIG, EXIT_USER_ERROR, SUPERVISED_ENV
from labtwin.orchestration.leash import leashed

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 15.0


@dataclass
class Backoff:
    """How long to wait before the next start, from how long the last child ran."""

    first_s: float = BACKOFF_FIRST_S
    max_s: float = BACKOFF_MAX_S
    healthy_after_s: float = HEALTHY_AFTER_S
    _next_s: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._next_s = self.first_s

    def after(self, ran_s: float) -> float:
        if ran_s >= self.healthy_after_s:
            self._next_s = self.first_s
        wait = self._next_s
        self._next_s = min(2 * self._next_s, self.max_s)
        return wait


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


def supervise(
    child_args: list[str],
    *,
    backoff: Backoff | None = None,
    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> int:
    """Run ``python -m labtwin.cli CHILD_ARGS...`` until SIGINT/SIGTERM; returns the supervisor's exit code."""
    backoff = backoff or Backoff()
    stop = threading.Event()
    received: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)  # the agent turns its output off and says it is offline

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.is_set():
            started = time.monotonic()
            child = subprocess.Popen(
                leashed([sys.executable, "-m", "labtwin.cli", *child_args]), env={**os.environ, SUPERVISED_ENV: "1"}
            )
            say(f"supervisor: agent started (pid {child.pid})")
            if stop.is_set():  # a signal between the check above and the start
                child.send_signal(signal.SIGTERM)
            stopping_since: float | None = None
            while True:
                try:
                    rc = child.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if stop.is_set():
                        stopping_since = stopping_since or time.monotonic()
                        if time.monotonic() - stopping_since > STOP_GRACE_S:
                            child.kill()
            ran_s = time.monotonic() - started
            if stop.is_set():
                say(f"supervisor: agent pid {child.pid} ended ({_describe(rc)}); supervisor stopping")
                break
            if rc == EXIT_CONFIG:
                say(
                    f"supervisor: agent pid {child.pid} cannot start as configured (its error is above); not "
                    "restarting it: fix that and start the supervisor again"
                )
                return EXIT_USER_ERROR
            wait_s = backoff.after(ran_s)
            say(
                f"supervisor: agent pid {child.pid} died ({_describe(rc)}) after {ran_s:.1f} s; "
                f"restarting in {wait_s:g} s"
            )
            stop.wait(wait_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 130 if signal.SIGINT in received else 0
