"""Running a compiled program step by step: which step comes next, given how the last one ended.

The flow asks ``next_command()``, runs the step on the agent, and hands the
agent's "ended" event to ``record()``. Control follows the protocol: a
step's ``then`` (next, goto a tag, stop, pause) for the condition that ended
it, loops that repeat until a cycle condition holds, and the protocol's
``stop_when`` checked after every cycle. Every decision is a function of
the step events alone, so the same events replayed give the same position:
that is how a resumed run finds the interrupted step (``replay``) without
any state of its own in the store.

Cycles are electrochemical (labtwin.analysis.cycles, the one definition):
the interpreter numbers each step with the cycle counter as it sends it,
from the direction its setpoint drives the cell, so the step's samples,
its events and the loop and stop conditions all carry the same cycle. A
cycle is complete when the next step would open the next one (or none
follows): that is when ``stop_when`` is checked, on the cycle's figures as
the run summary reports them (Coulombic efficiency by the half-cell
convention). The protocol's own loop counter is ``repetition``.

Step indices are execution counts (the n-th step the run sent), unique in
the run whatever the gotos and loops do; for a program without loops and
gotos they equal the compiled positions `protocol show` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from labtwin.analysis.cycles import (
    UNDIRECTED_STEPS,
    CycleCounter,
    CycleSummary,
    charge_direction,
    command_direction,
    summarize_cycle,
)
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
class Interpreter:
    program: Program
    pc: int = 0
    executed: int = 0
    repetition: int = 0  # the highest loop repetition given so far (the protocol's counter, not the cycle)
    stop_reason: str = ""
    counter: CycleCounter = field(default_factory=CycleCounter)
    steps_by_cycle: dict[int, list[StepEvent]] = field(default_factory=dict)  # ended steps per electrochemical cycle
    _iteration: dict[int, int] = field(default_factory=dict)
    _loop_repetition: dict[int, int] = field(default_factory=dict)
    _checked_cycle: int = 0  # the last cycle stop_when was checked on
    _last_voltage_V: float | None = None
    _pending: StepCommand | None = None

    # ------------------------------------------------------------------ figures

    def figures(self, cycle: int) -> CycleSummary:
        """A cycle's figures as the run summary reports them (labtwin.analysis.cycles)."""
        return summarize_cycle(cycle, self.steps_by_cycle.get(cycle, []), self.counter.first_direction)

    def last_complete_cycle(self) -> int | None:
        """The latest cycle that went both ways: the running one, else the one before it."""
        for c in (self.counter.cycle, self.counter.cycle - 1):
            if c > 0 and self.figures(c).coulombic_efficiency is not None:
                return c
        return None

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
                self._loop_repetition[instr.loop] = self.repetition = self.repetition + 1
                self.pc += 1
            elif isinstance(instr, LoopEnd):
                c = self.last_complete_cycle()
                met = c is not None and condition_met(instr.until, self, c)
                if met or self._iteration[instr.loop] >= instr.max_cycles:
                    self.pc += 1
                else:
                    self._iteration[instr.loop] += 1
                    self._loop_repetition[instr.loop] = self.repetition = self.repetition + 1
                    self.pc = instr.start + 1
            else:
                cmd = instr.command
                repetition = self._loop_repetition[instr.loops[-1]] if instr.loops else cmd.repetition
                direction = command_direction(cmd, self._last_voltage_V)
                if self.counter.opens_cycle(direction) and self._cycle_ended():
                    return None
                if self.executed >= MAX_STEPS:
                    self.stop_reason = f"stopped after {MAX_STEPS} steps: a goto or loop never met its condition"
                    return None
                self.repetition = max(self.repetition, repetition)
                cycle = self.counter.add(direction)
                self._pending = cmd.model_copy(
                    update={"step_index": self.executed, "repetition": repetition, "cycle": cycle}
                )
                return self._pending
        self._cycle_ended()
        return None

    def record(self, ended: StepEvent) -> Decision:
        """The step that ``next_command`` gave has ended on one of its conditions: what happens now."""
        cmd, self._pending = self._pending, None
        if cmd is None or ended.step_index != cmd.step_index:
            raise ResumeMismatch(f"step {ended.step_index} ended, but step {cmd.step_index if cmd else None} was next")
        self.executed += 1
        if ended.stats is not None:
            if cmd.cycle > 0:
                self.steps_by_cycle.setdefault(cmd.cycle, []).append(ended.model_copy(update={"cycle": cmd.cycle}))
            if ended.stats.end_voltage_V is not None:
                self._last_voltage_V = ended.stats.end_voltage_V
            if cmd.step not in UNDIRECTED_STEPS and command_direction(cmd, None) is None:
                self.counter.observed(charge_direction(ended))  # a voltage hold: the direction it measured
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

    def _cycle_ended(self) -> bool:
        """The running cycle is complete (the next step opens another, or none follows): check stop_when."""
        stop = self.program.stop_when
        done = self.counter.cycle
        if stop is None or done == 0 or done == self._checked_cycle:
            return False
        self._checked_cycle = done
        if condition_met(stop, self, done):
            self.stop_reason = f"stop_when met after cycle {done}: {describe(stop, self, done)}"
            return True
        return False


def _first_discharge_Ah(interp: Interpreter) -> tuple[int, float] | None:
    """The first cycle that went both ways and its discharge capacity: what fractions are of."""
    for c in sorted(interp.steps_by_cycle):
        figures = interp.figures(c)
        if figures.coulombic_efficiency is not None and figures.discharge_Ah > 0:
            return c, figures.discharge_Ah
    return None


def condition_met(condition: CycleCondition, interp: Interpreter, cycle: int) -> bool:
    this = interp.figures(cycle)
    if condition.cycles is not None and cycle >= condition.cycles:
        return True
    if condition.discharge_capacity_Ah_below is not None and this.discharge_Ah < condition.discharge_capacity_Ah_below:
        return True
    if condition.discharge_capacity_fraction_below is not None:
        first = _first_discharge_Ah(interp)
        if first and cycle != first[0] and this.discharge_Ah / first[1] < condition.discharge_capacity_fraction_below:
            return True
    ce = this.coulombic_efficiency
    if (
        condition.coulombic_efficiency_below is not None
        and ce is not None
        and ce < condition.coulombic_efficiency_below
    ):
        return True
    return False


def describe(condition: CycleCondition, interp: Interpreter, cycle: int) -> str:
    this = interp.figures(cycle)
    parts = [f"discharge {this.discharge_Ah * 1e3:.4g} mAh, charge {this.charge_Ah * 1e3:.4g} mAh"]
    first = _first_discharge_Ah(interp)
    if condition.discharge_capacity_fraction_below is not None and first:
        parts.append(
            f"{100 * this.discharge_Ah / first[1]:.1f} % of the first cycle's "
            f"(limit {100 * condition.discharge_capacity_fraction_below:g} %)"
        )
    if condition.coulombic_efficiency_below is not None and this.coulombic_efficiency is not None:
        parts.append(
            f"CE {100 * this.coulombic_efficiency:.2f} % (limit {100 * condition.coulombic_efficiency_below:g} %)"
        )
    if condition.cycles is not None:
        parts.append(f"{cycle} of {condition.cycles} cycles")
    return "; ".join(parts)
