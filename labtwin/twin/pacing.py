"""A simulated channel at max speed kept within a few samples of the twin that follows it (dry-runs only).

At max speed a simulated cell computes its samples as fast as the CPU allows, and its twin runs the same
model (plus its detectors) on what it receives: the cell ran ahead, and an anomaly policy's ``stop`` or
``pause`` landed hours of cell time after the onset that asked for it. A dry-run is meant to show where
the policy would act on a real channel (within a sample there), so in a dry-run the twin says how far it
has followed each run, and the simulated channel's agent waits for it before it goes more than one batch
ahead. When the twin flagged an anomaly whose policy acts (stop or pause), it holds its progress for
``ACTION_HOLD_S`` of wall time: the flow's StopRun or PauseRun reaches the agent while the cell waits.

Only in-process (``LocalLab``: the dry-run's agent and twin share the process) and only for a channel
that runs as fast as possible: a real channel, or a paced simulated one, never waits for anything but its
instrument. The wait is bounded (``MAX_WAIT_S``): a twin that stopped following never holds a channel.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

ACTION_HOLD_S = 2.0
MAX_WAIT_S = 5.0
_POLL_S = 0.01


class FollowProgress:
    """How far the twin has followed each run (cell seconds), shared by the twin and the paced agents."""

    def __init__(self) -> None:
        self._followed_s: dict[str, float] = {}
        self._held_until: dict[str, float] = {}
        self._ended: set[str] = set()
        self._changed = threading.Condition()

    def followed(self, run_id: str, time_s: float) -> None:
        with self._changed:
            if time_s > self._followed_s.get(run_id, -math.inf):
                self._followed_s[run_id] = time_s
            self._changed.notify_all()

    def hold(self, run_id: str) -> None:
        """An anomaly whose policy acts: the channel waits while the flow acts on it."""
        with self._changed:
            self._held_until[run_id] = time.monotonic() + ACTION_HOLD_S
            self._changed.notify_all()

    def ended(self, run_id: str) -> None:
        with self._changed:
            self._ended.add(run_id)
            self._followed_s.pop(run_id, None)
            self._held_until.pop(run_id, None)
            self._changed.notify_all()

    def wait(self, run_id: str, time_s: float, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """From a step thread: block until the twin has followed ``run_id`` up to ``time_s`` (True), the run
        ended or ``interrupted()`` (an abort, a pause) says to go on, or ``MAX_WAIT_S`` passed (False). A run
        the twin has not started following is not waited for."""
        deadline = time.monotonic() + MAX_WAIT_S
        with self._changed:
            while True:
                now = time.monotonic()
                if run_id in self._ended or run_id not in self._followed_s or interrupted():
                    return True
                if self._followed_s[run_id] >= time_s and now >= self._held_until.get(run_id, 0.0):
                    return True
                if now >= deadline:
                    return False
                self._changed.wait(_POLL_S)
