"""What the agent's event loop and its step thread share, behind one lock.

Commands arrive on the event loop (EndStep, PauseRun, ResumeRun, an abort) while the step runs in the
agent's own thread. Plain attributes shared by the two lost an EndStep that arrived between the step
being handed to the thread and the thread resetting its end request. Here the running step and the
end requests change together under one lock, so an EndStep is never lost:

- an EndStep for the running step ends it at its next sample;
- an EndStep for a step that has not started yet (it overtook its StepCommand, or arrived while the
  command waited in the queue) is kept and ends that step as soon as it starts;
- an EndStep for a step that already started in this run (it ended on its own first) is ignored.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from labtwin.devices.potentiostat import Reading
from labtwin.documents import EndReason, StepCommand


@dataclass
class _RunRequests:
    """End requests of one run: for steps still to come, and which steps already began."""

    run_id: str
    pending: dict[int, EndReason] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)


class StepControl:
    """The running step, its end request, pause and abort: the state both threads of an agent touch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.abort = threading.Event()  # set by an aborting StopRun or the agent's shutdown
        self.pause = threading.Event()  # set by PauseRun (or a pause-action limit), cleared by ResumeRun
        self._current: StepCommand | None = None
        self._end: EndReason | None = None  # the end request for the running step
        self._requests: _RunRequests | None = None
        self.last_reading: Reading | None = None  # the latest reading, for statuses sent from the event loop

    @property
    def current(self) -> StepCommand | None:
        """The step running now, or None between steps."""
        return self._current

    def begin_run(self, run_id: str) -> None:
        """A run starts on the channel: end requests of any earlier run are forgotten (those of this run,
        which may have overtaken its StartRun, are kept)."""
        with self._lock:
            if self._requests is None or self._requests.run_id != run_id:
                self._requests = _RunRequests(run_id)

    def begin_step(self, cmd: StepCommand) -> None:
        """The step thread is about to run ``cmd``: an end request that came early applies to it now."""
        with self._lock:
            requests = self._requests
            if requests is None or requests.run_id != cmd.run_id:
                requests = self._requests = _RunRequests(cmd.run_id)
            requests.started.add(cmd.step_index)
            self._current = cmd
            self._end = requests.pending.pop(cmd.step_index, None)

    def end_step(self) -> None:
        """The step is over (however it ended): no step is running."""
        with self._lock:
            self._current = None
            self._end = None

    def request_end(self, run_id: str, step_index: int, reason: EndReason) -> bool:
        """An EndStep from the flow. True when it ends (or will end) a step, False when it came too late."""
        with self._lock:
            requests = self._requests
            current = self._current
            if requests is None or requests.run_id != run_id:
                if current is not None:
                    return False  # another run's step is running: a stale flow's request
                # The run has not started here yet (its StartRun is still queued): keep it for that run.
                requests = self._requests = _RunRequests(run_id)
            if current is not None and current.run_id == run_id and current.step_index == step_index:
                if self._end is None:
                    self._end = reason
                return True
            if step_index in requests.started:
                return False  # that step already ran
            requests.pending.setdefault(step_index, reason)
            return True

    def end_requested(self, step_index: int) -> EndReason | None:
        """For the step thread, every sample: the reason to end step ``step_index`` now, if any."""
        with self._lock:
            current = self._current
            if current is None or current.step_index != step_index:
                return None
            return self._end
