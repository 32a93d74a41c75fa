"""Running a compiled program step by step: which step comes next, given how the last one ended.

The flow asks ``next_command()``, runs the step on the agent, and hands the
agent's "ended" event to ``record()``. Control follows the protocol: a
step's ``then`` (next, goto a tag, stop, pause) for the condition that ended
it, loops that repeat until a cycle condition holds, and the protocol's
``stop_when`` checked after every cycle. Every decision is a function of
the step events alone, so the same events replayed give the same position:
that is how a resumed run finds the interrupted step (``replay``) without
any state of its own in the store.

Step indices are execution counts (the n-th step the run sent), unique in
the run whatever the gotos and loops do; for a program without loops and
gotos they equal the compiled positions `protocol show` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labtwin.documents import StepCommand, StepEvent
from labtwin.protocols.compile import LoopEnd, LoopStart, Program
from labtwin.protocols.model import CycleCondition, Goto

MAX_STEPS = 1_000_000  # a goto cycle that never meets its condition ends here, not never


class ResumeMismatch(RuntimeError):
    """The stored steps of a run do not follow from its protocol (the protocol file changed since)."""


@dataclass
class Decision:
    action: str  # "next" | "stop" | "pause"
    reason: str = ""


@dataclass
class CycleTally:
    charge_Ah: float = 0.0
    discharge_Ah: float = 0.0


@dataclass
class Interpreter:
    program: Program
    pc: int = 0
    executed: int = 0
    cycle: int = 0  # the highest cycle number given so far
    stop_reason: str = ""
    tally: dict[int, CycleTally] = field(default_factory=dict)
    _iteration: dict[int, int] = field(default_factory=dict)
    _loop_cycle: dict[int, int] = field(default_factory=dict)
    _last_cycle: int | None = None
    _pending: StepCommand | None = None

    # ------------------------------------------------------------------ stepping

    def next_command(self) -> StepCommand | None:
        """The next step to run (the same one until it is recorded), or None when the run is over
        (``stop_reason`` says why, if a condition stopped it)."""
        if self._pending is not None:
            return self._pending
        if self.stop_reason:
            return None
        instructions = self.program.instructions
        while self.pc < len(instructions):
            instr = instructions[self.pc]
            if isinstance(instr, LoopStart):
                self._iteration[instr.loop] = 1
                self._loop_cycle[instr.loop] = self.cycle = self.cycle + 1
                self.pc += 1
            elif isinstance(instr, LoopEnd):
                c = self._loop_cycle[instr.loop]
                met = condition_met(instr.until, self.tally, c)
                if met or self._iteration[instr.loop] >= instr.max_cycles:
                    self.pc += 1
                else:
                    self._iteration[instr.loop] += 1
                    self._loop_cycle[instr.loop] = self.cycle = self.cycle + 1
                    self.pc = instr.start + 1
            else:
                cmd = instr.command
                cycle = self._loop_cycle[instr.loops[-1]] if instr.loops else cmd.cycle
                if self._cycle_ended(cycle):
                    return None
                if self.executed >= MAX_STEPS:
                    self.stop_reason = f"stopped after {MAX_STEPS} steps: a goto or loop never met its condition"
                    return None
                self.cycle = max(self.cycle, cycle)
                self._pending = cmd.model_copy(update={"step_index": self.executed, "cycle": cycle})
                return self._pending
        self._cycle_ended(None)
        return None

    def record(self, ended: StepEvent) -> Decision:
        """The step that ``next_command`` gave has ended on one of its conditions: what happens now."""
        cmd, self._pending = self._pending, None
        if cmd is None or ended.step_index != cmd.step_index:
            raise ResumeMismatch(f"step {ended.step_index} ended, but step {cmd.step_index if cmd else None} was next")
        self.executed += 1
        self._last_cycle = cmd.cycle
        if ended.stats is not None and cmd.cycle > 0:
            tally = self.tally.setdefault(cmd.cycle, CycleTally())
            tally.charge_Ah += ended.stats.charge_Ah
            tally.discharge_Ah += ended.stats.discharge_Ah
        instr = self.program.instructions[self.pc]
        condition = ended.reason.name if ended.reason is not None else "time_s"
        action = instr.then.get(condition, "next")
        if isinstance(action, Goto):
            self.pc = self.program.tags[action.goto]  # onto a loop's start: the loop begins afresh
            return Decision("next", f"{condition}: goto {action.goto}")
        self.pc += 1
        why = f"step {cmd.step_index} ({cmd.label}) ended on {condition}"
        if action == "stop":
            self.stop_reason = f"{why}: then stop"
            return Decision("stop", self.stop_reason)
        if action == "pause":
            return Decision("pause", f"{why}: then pause")
        return Decision("next")

    def replace_next(self, command: StepCommand) -> None:
        """Run this instead of the next step (same index): a resumed step with what is left of its time."""
        if self._pending is None or command.step_index != self._pending.step_index:
            raise ValueError("replace_next takes the step next_command gave, changed")
        self._pending = command

    def replay(self, events: list[StepEvent]) -> None:
        """Go through a run's completed steps again (in step order) to stand where it was interrupted."""
        for event in sorted(events, key=lambda e: e.step_index):
            cmd = self.next_command()
            if cmd is None or cmd.step_index != event.step_index or not event.label.startswith(cmd.label):
                expected = "the end of the program" if cmd is None else f"step {cmd.step_index} ({cmd.label})"
                raise ResumeMismatch(
                    f"the stored step {event.step_index} ({event.label}) is not what the protocol "
                    f"runs there ({expected}): was the protocol file changed since the run began?"
                )
            self.record(event)

    # ------------------------------------------------------------------ experiment-level stop

    def _cycle_ended(self, next_cycle: int | None) -> bool:
        """Check stop_when when a cycle is complete (the next step belongs to another, or none follows)."""
        stop = self.program.stop_when
        if stop is None or self._last_cycle in (None, 0) or next_cycle == self._last_cycle:
            return False
        done = self._last_cycle
        if condition_met(stop, self.tally, done):
            self.stop_reason = f"stop_when met after cycle {done}: {describe(stop, self.tally, done)}"
            return True
        return False


def condition_met(condition: CycleCondition, tally: dict[int, CycleTally], cycle: int) -> bool:
    this = tally.get(cycle, CycleTally())
    if condition.cycles is not None and cycle >= condition.cycles:
        return True
    if condition.discharge_capacity_Ah_below is not None and this.discharge_Ah < condition.discharge_capacity_Ah_below:
        return True
    if condition.discharge_capacity_fraction_below is not None:
        first = next((tally[c].discharge_Ah for c in sorted(tally) if tally[c].discharge_Ah > 0), None)
        if (
            first
            and cycle != min(c for c in tally if tally[c].discharge_Ah > 0)
            and this.discharge_Ah / first < condition.discharge_capacity_fraction_below
        ):
            return True
    if (
        condition.coulombic_efficiency_below is not None
        and this.charge_Ah > 0
        and this.discharge_Ah / this.charge_Ah < condition.coulombic_efficiency_below
    ):
        return True
    return False


def describe(condition: CycleCondition, tally: dict[int, CycleTally], cycle: int) -> str:
    this = tally.get(cycle, CycleTally())
    parts = [f"discharge {this.discharge_Ah * 1e3:.4g} mAh, charge {this.charge_Ah * 1e3:.4g} mAh"]
    first = next((tally[c].discharge_Ah for c in sorted(tally) if tally[c].discharge_Ah > 0), None)
    if condition.discharge_capacity_fraction_below is not None and first:
        parts.append(
            f"{100 * this.discharge_Ah / first:.1f} % of the first cycle's "
            f"(limit {100 * condition.discharge_capacity_fraction_below:g} %)"
        )
    if condition.coulombic_efficiency_below is not None and this.charge_Ah > 0:
        parts.append(
            f"CE {100 * this.discharge_Ah / this.charge_Ah:.2f} % (limit {100 * condition.coulombic_efficiency_below:g} %)"
        )
    if condition.cycles is not None:
        parts.append(f"{cycle} of {condition.cycles} cycles")
    return "; ".join(parts)
