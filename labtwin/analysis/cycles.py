"""THE definition of a cycle and its figures: every output of labtwin reads its cycles from here.

Cycle numbering. A cycle is counted from the direction charge moves, as a
cycler's analysis does, never from the protocol's loops. The run's first
step that drives current sets the direction every cycle starts with; each
later step in that direction that follows a step in the other direction
opens the next cycle. Rests, impedance spectra and voltammetry sweeps (which
go both ways) drive no direction: they belong to the cycle they sit in.
Steps before any current flowed are cycle 0 (an initial rest). The count is
incremental (``CycleCounter``): a step's cycle is fixed when the step
starts, so the step's samples, its events, the twin and the interpreter's
loop and stop conditions all carry one number. The interpreter assigns it
(from the command's setpoint) and the agent stamps it on every sample;
files from other cyclers are numbered with the same counter from the
direction their steps measured.

Charge and energy. A step's charge is the agent's bookkeeping: the
trapezoid of the current between consecutive readings, the first reading of
a step counting from the step's start; each increment goes to "charge"
(into the cell, positive current) or "discharge" by its sign. From a file
the same increments are the differences of its net-charge column (labtwin's
``capacity_Ah``, BDF's ``Net Charge / Ah``, EC-Lab's ``(Q-Qo)/mA.h``), so a
file gives the figures the agent measured, however sparsely it recorded.

Coulombic efficiency (the half-cell convention). CE is the charge the
cycle's second direction returns over the charge its first direction put
in; the first direction is that of the run's first step when it moved a
substantial charge, else charge (``run_first_direction``: a partial step
at the start of a file does not make a cathode an anode half cell). For a cathode or a full cell, started by charging, that is
discharge / charge; for an anode half cell started by lithiation (LTO|Li,
discharging first) it is charge / discharge, so a film that keeps lithium
reads below 1 either way. A cycle that did not go both ways has no CE. The
delivered capacity is the second direction's charge: discharge for a
cathode or full cell, charge (delithiation) for an anode half cell.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel

from labtwin.documents import StepCommand, StepEvent, StepKind

Direction = Literal["charge", "discharge"]

# Steps that drive no direction: they never open a cycle.
UNDIRECTED_STEPS = frozenset({StepKind.rest, StepKind.eis, StepKind.cyclic_voltammetry})

# A constant-voltage hold within this much of the cell's voltage drives no direction of its own (the CV
# of a CC-CV pair: it continues the direction of the step before it).
CV_DEAD_BAND_V = 1e-3


def charge_direction(ev: StepEvent) -> Direction | None:
    """The direction a finished step moved charge in, measured, or None when it moved none on balance.

    Impedance steps never count (their small AC charge averages out, and its
    sign is noise), nor do steps whose charge and discharge are within a
    factor of ten of each other (a CV sweep goes both ways).
    """
    if ev.stats is None or ev.step in (StepKind.eis, StepKind.cyclic_voltammetry):
        return None
    charge, discharge = ev.stats.charge_Ah, ev.stats.discharge_Ah
    if max(charge, discharge) <= 1e-12 or max(charge, discharge) < 10.0 * min(charge, discharge):
        return None
    return "charge" if charge > discharge else "discharge"


def command_direction(cmd: StepCommand, voltage_before_V: float | None) -> Direction | None:
    """The direction a step will drive the cell, known before it runs (so its cycle is too).

    Set by the setpoint's sign for current and power steps; a voltage hold
    charges when held above the voltage the cell is at (``voltage_before_V``,
    the previous step's end), discharges below it, and drives nothing new
    within ``CV_DEAD_BAND_V`` of it.
    """
    if cmd.step in UNDIRECTED_STEPS:
        return None
    if cmd.step in (StepKind.cc, StepKind.cccv, StepKind.gitt) and cmd.current_A:
        return "charge" if cmd.current_A > 0 else "discharge"
    if cmd.step is StepKind.cp and cmd.power_W:
        return "charge" if cmd.power_W > 0 else "discharge"
    if cmd.step is StepKind.cv and cmd.voltage_V is not None and voltage_before_V is not None:
        if abs(cmd.voltage_V - voltage_before_V) <= CV_DEAD_BAND_V:
            return None
        return "charge" if cmd.voltage_V > voltage_before_V else "discharge"
    return None


@dataclass
class CycleCounter:
    """The incremental cycle count (module docstring): feed it each step's direction in run order."""

    cycle: int = 0
    first_direction: Direction | None = None
    previous_direction: Direction | None = None

    def opens_cycle(self, direction: Direction | None) -> bool:
        """Whether a step in this direction would begin a new cycle (cycle 1 included)."""
        if direction is None:
            return False
        if self.first_direction is None:
            return True
        return direction == self.first_direction and self.previous_direction not in (None, self.first_direction)

    def add(self, direction: Direction | None) -> int:
        """The cycle of the next step, which drives ``direction`` (None: a rest, a spectrum, a sweep)."""
        if self.opens_cycle(direction):
            self.cycle += 1
            if self.first_direction is None:
                self.first_direction = direction
        if direction is not None:
            self.previous_direction = direction
        return self.cycle

    def observed(self, direction: Direction | None) -> None:
        """A step whose direction was unknown when it started turned out to drive one: the next steps
        are numbered knowing it (the step itself keeps the cycle it started in)."""
        if direction is None:
            return
        if self.first_direction is None:
            self.first_direction, self.cycle = direction, max(self.cycle, 1)
        self.previous_direction = direction


def number_steps(directions: Iterable[Direction | None]) -> list[int]:
    """The cycle of each step from the direction each one drove, in run order."""
    counter = CycleCounter()
    return [counter.add(d) for d in directions]


def coulombic_efficiency(
    charge_Ah: float, discharge_Ah: float, first_direction: Direction | str | None
) -> float | None:
    """The second direction's charge over the first's (module docstring); None unless both moved charge."""
    if charge_Ah <= 0 or discharge_Ah <= 0 or first_direction is None:
        return None
    return charge_Ah / discharge_Ah if first_direction == "discharge" else discharge_Ah / charge_Ah


class CycleSummary(BaseModel):
    """One cycle's figures, as every output reports them."""

    cycle: int
    charge_Ah: float
    discharge_Ah: float
    coulombic_efficiency: float | None
    energy_in_Wh: float
    energy_out_Wh: float
    end_of_charge_V: float | None
    end_of_discharge_V: float | None
    first_direction: str | None

    @property
    def delivered_Ah(self) -> float:
        """The capacity the cell gives back: discharge for a cathode or full cell, charge for an anode half cell."""
        return self.charge_Ah if self.first_direction == "discharge" else self.discharge_Ah

    @property
    def mean_polarization_V(self) -> float | None:
        """Mean charge voltage minus mean discharge voltage (each direction's energy over its charge)."""
        if self.charge_Ah <= 0 or self.discharge_Ah <= 0:
            return None
        return self.energy_in_Wh / self.charge_Ah - self.energy_out_Wh / self.discharge_Ah


SUBSTANTIAL_SHARE = 0.5  # of the run's largest one-step charge: a half cycle, not a partial step from rest


def run_first_direction(events: Iterable[StepEvent]) -> Direction | None:
    """The direction the run's cycles start with, for the CE convention.

    The run's first step that moved charge, when it moved a substantial charge (at least half its largest
    step's): an anode half cell lithiated first (LTO|Li) opens with a whole discharge, a cathode or full cell
    with a whole charge. When that first step is partial (a file cut mid-charge; a cathode's few percent of
    discharge from rest before its first charge: EC-Lab GCPL, a Maccor rate test), it says nothing about the
    cell, and the cycles are a cathode's or full cell's, charge first, as every peer reads such files (a partial
    first discharge made the GCPL file an anode: CE 1.07-1.16 where peers read 0.92-0.94).
    """
    moved: list[tuple[Direction, float]] = []
    for ev in sorted(events, key=lambda e: e.step_index):
        if ev.event == "ended" and ev.cycle > 0 and (d := charge_direction(ev)) is not None and ev.stats:
            moved.append((d, ev.stats.charge_Ah if d == "charge" else ev.stats.discharge_Ah))
    if not moved:
        return None
    largest = max(amount for _, amount in moved)
    first, amount = moved[0]
    if amount >= SUBSTANTIAL_SHARE * largest:
        return first
    return "charge" if any(d == "charge" for d, _ in moved) else first


def summarize_cycle(cycle: int, events: list[StepEvent], first_direction: Direction | str | None) -> CycleSummary:
    """The figures of one cycle from the ended events of its steps (the agent's step statistics)."""
    stats = [e.stats for e in events if e.stats is not None]
    directions = [charge_direction(e) for e in events]
    charge = sum(s.charge_Ah for s in stats)
    discharge = sum(s.discharge_Ah for s in stats)
    both_ways = {"charge", "discharge"} <= set(directions)
    eoc = [e.stats.end_voltage_V for e, d in zip(events, directions) if d == "charge" and e.stats]
    eod = [e.stats.end_voltage_V for e, d in zip(events, directions) if d == "discharge" and e.stats]
    return CycleSummary(
        cycle=cycle,
        charge_Ah=charge,
        discharge_Ah=discharge,
        coulombic_efficiency=coulombic_efficiency(charge, discharge, first_direction) if both_ways else None,
        energy_in_Wh=sum(s.energy_in_Wh for s in stats),
        energy_out_Wh=sum(s.energy_out_Wh for s in stats),
        end_of_charge_V=eoc[-1] if eoc else None,
        end_of_discharge_V=eod[-1] if eod else None,
        first_direction=first_direction,
    )


def retention_reference(cycles: list[CycleSummary]) -> CycleSummary | None:
    """The cycle capacity retention is measured against: the first that went both ways and delivered a
    substantial capacity (half the largest). A file that opens mid-charge or with a partial step from rest has a
    first cycle of a fraction of the capacity; retention against it read 559 % and 4298 % on real files."""
    complete = [c for c in cycles if c.coulombic_efficiency is not None and c.delivered_Ah > 0]
    if not complete:
        return None
    largest = max(c.delivered_Ah for c in complete)
    return next(c for c in complete if c.delivered_Ah >= SUBSTANTIAL_SHARE * largest)


def summarize_cycles(events: Iterable[StepEvent]) -> list[CycleSummary]:
    """Per-cycle figures of a run from its ended step events, grouped by the cycle each step carries."""
    ended = sorted((e for e in events if e.event == "ended" and e.stats is not None), key=lambda e: e.step_index)
    by_cycle: dict[int, list[StepEvent]] = defaultdict(list)
    for ev in ended:
        by_cycle[ev.cycle].append(ev)
    first = run_first_direction(ended)
    return [summarize_cycle(c, by_cycle[c], first) for c in sorted(by_cycle) if c > 0]


def charge_increments(
    time_s: np.ndarray, current_A: np.ndarray, step: np.ndarray, net_charge_Ah: np.ndarray | None = None
) -> np.ndarray:
    """The signed charge each sample adds (Ah, positive = into the cell), as the agent counts it.

    With a net-charge column, its differences (the first sample's from zero,
    the run's start): exact whatever the recording interval. Without one, the
    agent's own rule on the current: a trapezoid between readings of a step,
    the first reading of a step times the time since the one before.
    """
    n = len(time_s)
    if n == 0:
        return np.zeros(0)
    if net_charge_Ah is not None and np.all(np.isfinite(net_charge_Ah)):
        q = np.asarray(net_charge_Ah, dtype=float)
        return np.diff(q, prepend=0.0)
    t = np.asarray(time_s, dtype=float)
    i = np.asarray(current_A, dtype=float)
    s = np.asarray(step)
    dt = np.diff(t, prepend=t[:1])
    same_step = np.concatenate([[False], s[1:] == s[:-1]])
    previous_i = np.concatenate([i[:1], i[:-1]])
    return np.where(same_step, 0.5 * (i + previous_i), i) * dt / 3600.0
