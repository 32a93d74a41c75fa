"""Who holds the channel: the run in progress, and when a run whose flow went silent gives way.

The agent is the channel's lease. A run holds it while one of its steps runs or while its flow spoke
less than ``grace_s`` ago (60 s by default); a newcomer's StartRun is refused meanwhile, and its flow
sees the refusal in the channel's status and waits. A run whose flow has been quiet longer was
abandoned (its flow was killed): the next run supersedes it, and it is closed as aborted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from labtwin.documents import EndReason, StartRun, StepEvent, StepStats

DEFAULT_GRACE_S = 60.0


@dataclass
class RunContext:
    """What the agent tracks for the run in progress: its record's counters and how each step ended."""

    run_id: str
    cell_id: str
    protocol: str
    n_steps: int
    start_cell_s: float
    capacity_Ah: float = 0.0
    next_seq: int = 0
    n_samples: int = 0
    n_batches: int = 0
    tripped: EndReason | None = None
    last_time_s: float = 0.0
    last_command_wall: float = field(default_factory=time.monotonic)
    step_running: bool = False
    ended: dict[int, StepEvent] = field(default_factory=dict)  # how each step of this run ended, by index
    carried: dict[int, StepStats] = field(default_factory=dict)  # a resumed step's statistics from before the crash
    # Rebuilt from the spool by a restarted agent, and its flow has not spoken to this agent yet: the channel's
    # status names no run (a flow resuming it sends StartRun with its resume point) until it does.
    restarted: bool = False

    @classmethod
    def start(cls, cmd: StartRun, now_cell_s: float) -> RunContext:
        """The context of a run that starts now; a resumed run goes on from where the store has its record."""
        run = cls(cmd.run_id, cmd.cell_id, cmd.protocol, cmd.n_steps, start_cell_s=now_cell_s)
        if cmd.resume is not None:
            r = cmd.resume
            run.start_cell_s -= r.time_s
            run.last_time_s, run.capacity_Ah = r.time_s, r.capacity_Ah
            run.next_seq, run.n_samples = r.next_seq, r.n_samples
            if r.step_index is not None and r.step_stats is not None:
                run.carried[r.step_index] = r.step_stats
        return run

    def heard_from_flow(self) -> None:
        """The run's flow sent a command (or its step just ended): the silence clock starts again."""
        self.last_command_wall = time.monotonic()

    def quiet_s(self) -> float:
        """Wall seconds since the run's flow last spoke."""
        return time.monotonic() - self.last_command_wall


@dataclass(frozen=True)
class Lease:
    """The rule for handing the channel over: a run keeps it while a step runs or its flow spoke recently."""

    grace_s: float = DEFAULT_GRACE_S

    def holds(self, run: RunContext) -> bool:
        """True when ``run`` keeps the channel and a newcomer is refused."""
        return run.step_running or run.quiet_s() < self.grace_s
