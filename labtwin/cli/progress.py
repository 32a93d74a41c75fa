"""Progress of the runs a command drives, on stderr, fed by the bus like any other subscriber.

`labtwin demo`, `dryrun`, `run` and `campaign run` show one line per channel: steps done of the run's
total, the current step's label, its cycle, the cell time and an ETA. The figures come from the
agent's RunStart and StepEvent documents alone (what `monitor` sees too), so the view is the same
whether the agent runs in this process or on another PC.

Where it shows (``progress_mode``): on stderr, so stdout keeps only the results (``--json`` stays
parseable). By default only when stderr is a terminal and the command does not print JSON;
``--progress`` forces it, and off a terminal it then prints one plain line per step start and end
(a CI log or ``2> file`` gets readable lines, not cursor codes); ``--no-progress`` turns it off.

The ETA is the wall time the run's steps took so far, per step, times the steps left: steps differ
in length, so it is a guide, not a promise. A loop until a condition runs more steps than the
protocol lists; past the listed total the ETA is unknown and the bar counts on.

Which runs: those whose RunStart is published after the view subscribed (give or take CLOCK_SKEW_S),
on the channels it was given. An agent that starts publishes what its spool never handed to the bus,
an earlier run's documents among them; they are the recorder's, not this command's progress.

A progress view is never worth a run: a document it cannot show, or a broker it cannot reach, is
logged once and the run goes on without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID
from rich.progress import TextColumn as RichTextColumn
from rich.text import Text

# Declared in options (every command module imports them), re-exported here where they were first.
from labtwin.cli.options import Mode as Mode
from labtwin.cli.options import ProgressOpt as ProgressOpt
from labtwin.cli.options import progress_mode as progress_mode
from labtwin.documents import RunStart, RunStop, StepEvent
from labtwin.documents.base import utc_now
from labtwin.security import BrokerConnection

log = logging.getLogger(__name__)


# After the flow returns, the last step's end and the RunStop may still be on their way to this
# subscriber: wait this long for them (or until every run it saw has stopped).
DRAIN_S = 2.0
# A RunStart stamped this long before the view subscribed is an earlier run's, republished (module docstring).
CLOCK_SKEW_S = 30.0


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 3600:
        return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
    return f"{int(seconds) // 3600}:{int(seconds) % 3600 // 60:02d}:{int(seconds) % 60:02d}"


@dataclass
class ChannelRun:
    """What one channel's current run has done, from its documents."""

    channel: str
    protocol: str = ""
    cell_id: str = ""
    run_id: str = ""
    n_steps: int | None = None
    done: int = 0
    label: str = ""
    cycle: int = 0
    cell_time_s: float = 0.0
    started_wall: float = field(default_factory=time.monotonic)
    stopped: str | None = None  # the RunStop's exit status

    def eta_s(self, now: float | None = None) -> float | None:
        """Wall seconds left at the pace of the steps so far; None before a step ended or past the total."""
        if self.stopped is not None:
            return 0.0
        if not self.done or self.n_steps is None or self.done > self.n_steps:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.started_wall
        return elapsed / self.done * (self.n_steps - self.done)

    @property
    def where(self) -> str:
        """The current step and cycle, as a line shows them."""
        if self.stopped is not None:
            return f"{self.stopped} after {self.done} steps"
        return f"cycle {self.cycle}: {self.label}" if self.label else "starting"


class _EtaColumn(ProgressColumn):
    """Cell time and ETA of a channel's run (``ChannelRun``, in the task's fields)."""

    def render(self, task: Task) -> Text:
        run: ChannelRun | None = task.fields.get("run")
        if run is None:
            return Text("")
        return Text(f"cell {run.cell_time_s / 3600:.2f} h · ETA {_duration(run.eta_s())}", style="progress.remaining")


class RunProgress:
    """Progress per channel from bus documents: ``take`` each one; a context manager around the run.

    ``channels``: the channels to show (None: every channel that starts a run). ``mode``: "live" rich
    bars, "lines" one printed line per step start and end, "off" nothing. ``since``: runs started
    before it are not shown (an earlier run's documents, republished)."""

    def __init__(
        self,
        console: Console,
        mode: Mode = "live",
        channels: Iterable[str] | None = None,
        since: datetime | None = None,
    ) -> None:
        self.console = console
        self.mode = mode
        self.channels = set(channels) if channels is not None else None
        self.since = since
        self.runs: dict[str, ChannelRun] = {}
        self.lines: list[str] = []  # what "lines" mode printed, in order
        self._bars: dict[str, TaskID] = {}
        self._progress = Progress(
            SpinnerColumn(),
            RichTextColumn("{task.description}", style="bold"),
            BarColumn(),
            MofNCompleteColumn(),
            _EtaColumn(),
            console=console,
            disable=mode != "live",
            transient=False,
            refresh_per_second=4,
        )
        for channel in sorted(self.channels or ()):
            self._bar(channel)

    def __enter__(self) -> RunProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @property
    def all_stopped(self) -> bool:
        return bool(self.runs) and all(r.stopped is not None for r in self.runs.values())

    def _bar(self, channel: str) -> TaskID:
        if channel not in self._bars:
            self._bars[channel] = self._progress.add_task(channel, total=None, run=None)
        return self._bars[channel]

    def take(self, doc: object) -> None:
        """Absorb one document; one this view cannot show is logged and skipped."""
        try:
            self._take(doc)
        except Exception as exc:
            log.error("progress: %s skipped: %s: %s", type(doc).__name__, type(exc).__name__, exc)

    def _take(self, doc: object) -> None:
        channel = getattr(doc, "channel", None)
        if not isinstance(channel, str) or (self.channels is not None and channel not in self.channels):
            return
        if isinstance(doc, RunStart):
            if self.since is not None and doc.time < self.since:
                return
            started = ChannelRun(channel, doc.protocol, doc.cell_id, doc.run_id, doc.n_steps or None)
            self.runs[channel] = started
            self._show(started, f"run {doc.run_id} started: {doc.protocol} on {doc.cell_id}, {doc.n_steps} steps")
            return
        run = self.runs.get(channel)
        if run is None or getattr(doc, "run_id", None) != run.run_id:
            return  # a run this view did not see start (another's, or one that began before it subscribed)
        if isinstance(doc, StepEvent):
            run.cycle, run.cell_time_s = doc.cycle, max(run.cell_time_s, doc.time_s)
            if doc.event == "started":
                run.label = doc.label or doc.step.value
                self._show(run, f"step {doc.step_index} started, cycle {doc.cycle}: {run.label}")
            else:
                run.done += 1
                ended_by = f" ended by {doc.reason.kind}:{doc.reason.name}" if doc.reason is not None else " ended"
                self._show(run, f"step {doc.step_index}{ended_by}, cycle {doc.cycle}: {doc.label or doc.step.value}")
        elif isinstance(doc, RunStop):
            run.stopped = doc.exit_status
            run.cell_time_s = max(run.cell_time_s, doc.cell_time_s)
            self._show(run, f"run {doc.exit_status}" + (f" ({doc.reason})" if doc.reason else ""))

    def _show(self, run: ChannelRun, what: str) -> None:
        total = run.n_steps if run.n_steps is not None and run.done <= run.n_steps else None
        if run.stopped is not None:
            total = run.done
        self._progress.update(
            self._bar(run.channel),
            total=total,
            completed=run.done,
            description=f"{run.channel} {run.protocol} · {run.where}",
            run=run,
        )
        if self.mode == "lines":
            steps = f"{run.done}/{run.n_steps}" if run.n_steps else str(run.done)
            line = (
                f"{run.channel}: {what} · {steps} steps done · cell time {run.cell_time_s / 3600:.2f} h"
                f" · ETA {_duration(run.eta_s())}"
            )
            self.lines.append(line)
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)


async def _read(sub, view: RunProgress, stop: asyncio.Event) -> None:
    drain_until: float | None = None
    while True:
        if stop.is_set() and drain_until is None:
            drain_until = time.monotonic() + DRAIN_S
        if drain_until is not None and (time.monotonic() >= drain_until or view.all_stopped):
            return
        try:
            message = await sub.get(0.1)
        except TimeoutError:
            continue
        view.take(message.document)


@contextlib.asynccontextmanager
async def follow_progress(
    broker: str | BrokerConnection,
    lab: str,
    mode: Mode,
    console: Console,
    channels: Iterable[str] | None = None,
) -> AsyncIterator[RunProgress]:
    """Show the progress of the runs on ``lab``'s ``channels`` while the body runs.

    It subscribes before the body starts, so the runs' RunStart is not missed; it connects as the
    connection's identity (the caller's: whoever drives the run may read its events). When the body
    is done it waits briefly for the last step's end (DRAIN_S)."""
    view = RunProgress(console, mode, channels, since=utc_now() - timedelta(seconds=CLOCK_SKEW_S))
    if mode == "off":
        yield view
        return
    from labtwin import bus as busmod  # here: every command imports this module, few of them follow a run
    from labtwin.bus import Bus

    async with contextlib.AsyncExitStack() as stack:
        sub = None
        try:
            bus = await stack.enter_async_context(Bus(broker, f"progress-{uuid.uuid4().hex[:10]}"))
            sub = await bus.subscribe(f"{busmod.ROOT}/{lab}/+/event")
        except Exception as exc:  # the run does not need it: say so once and go on without
            log.warning("progress: not shown, the bus refused it: %s: %s", type(exc).__name__, exc)
        if sub is None:
            yield view
            return
        stop = asyncio.Event()
        with view:
            reader = asyncio.create_task(_read(sub, view, stop), name="progress")
            try:
                yield view
            except BaseException:
                reader.cancel()  # the run failed or was interrupted: its last lines are not worth waiting for
                raise
            else:
                stop.set()
            finally:
                await asyncio.gather(reader, return_exceptions=True)  # its own end, even cancelled, is no error
