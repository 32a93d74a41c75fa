"""Run summaries from step events alone: per-cycle capacities, Coulombic efficiency, end voltages.

Every StepEvent "ended" carries the agent's own bookkeeping of the step
(charge in, charge out, energy, end voltage), so a summary needs no samples:
the flow can report it the moment the run ends, and the store can rebuild it.

Coulombic efficiency is charge out over charge in, with "in" being the
direction the cycle starts with: for a cathode or full cell that starts by
charging it is discharge/charge; for an anode half cell (LTO vs Li) that
starts by lithiating (discharging) it is charge/discharge, as in seed 000.

Cycles are counted from the charge the steps moved, as a cycler's analysis
does, not from the protocol's loop counters: the run's first current-carrying
step sets the direction a cycle starts with, and every later step in that
direction that follows a step in the other direction opens the next cycle.
Rests and impedance steps belong to the cycle they sit in. Nested loops
(9 cycles, then a 10th with a check-up EIS) therefore count 10 cycles, not 1.
"""

from __future__ import annotations

from collections import defaultdict

from pydantic import BaseModel

from labtwin.documents import StepEvent, StepKind


class CycleSummary(BaseModel):
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
        return self.discharge_Ah if self.first_direction != "discharge" else self.charge_Ah

    @property
    def mean_polarization_V(self) -> float | None:
        """Mean charge voltage minus mean discharge voltage (each direction's energy over its charge)."""
        if self.charge_Ah <= 0 or self.discharge_Ah <= 0:
            return None
        return self.energy_in_Wh / self.charge_Ah - self.energy_out_Wh / self.discharge_Ah


def coulombic_efficiency(charge_Ah: float, discharge_Ah: float, first_direction: str | None) -> float | None:
    """Charge out over charge in, "in" being the direction the cycle starts with (module docstring)."""
    if charge_Ah <= 0 or discharge_Ah <= 0:
        return None
    return discharge_Ah / charge_Ah if first_direction == "charge" else charge_Ah / discharge_Ah


class StepEnd(BaseModel):
    step_index: int
    label: str
    cycle: int
    reason: str
    value: float | None
    duration_s: float


class RunSummary(BaseModel):
    run_id: str
    channel: str
    cell_id: str = ""
    protocol: str = ""
    exit_status: str = ""
    reason: str = ""
    steps_run: int
    cell_time_s: float
    wall_time_s: float | None = None
    n_samples: int
    cycles: list[CycleSummary]
    step_ends: list[StepEnd]


def charge_direction(ev: StepEvent) -> str | None:
    """The direction a step moved charge in, or None when it moved none on balance.

    Impedance steps never count (their small AC charge averages out, and its
    sign is noise), nor do steps whose charge and discharge are within a
    factor of ten of each other (a CV sweep goes both ways).
    """
    if ev.stats is None or ev.step == StepKind.eis:
        return None
    charge, discharge = ev.stats.charge_Ah, ev.stats.discharge_Ah
    if max(charge, discharge) <= 1e-12 or max(charge, discharge) < 10.0 * min(charge, discharge):
        return None
    return "charge" if charge > discharge else "discharge"


def number_cycles(events: list[StepEvent]) -> list[tuple[int, StepEvent]]:
    """(electrochemical cycle, event) for each ended step; cycle 0 before the first current flows."""
    numbered, cycle, first, previous = [], 0, None, None
    for ev in sorted(events, key=lambda e: e.step_index):
        if ev.event != "ended" or ev.stats is None:
            continue
        direction = charge_direction(ev)
        if direction is not None:
            if first is None:
                first, cycle = direction, 1
            elif direction == first and previous not in (None, first):
                cycle += 1
            previous = direction
        numbered.append((cycle, ev))
    return numbered


def summarize_cycles(events: list[StepEvent]) -> list[CycleSummary]:
    by_cycle: dict[int, list[StepEvent]] = defaultdict(list)
    for cycle, ev in number_cycles(events):
        by_cycle[cycle].append(ev)
    out = []
    for cycle in sorted(by_cycle):
        if cycle == 0:
            continue  # steps before any current flowed (an initial rest, a check-up)
        evs = by_cycle[cycle]
        charge = sum(e.stats.charge_Ah for e in evs)
        discharge = sum(e.stats.discharge_Ah for e in evs)
        first = next((d for d in map(charge_direction, evs) if d is not None), None)
        both_ways = len({d for d in map(charge_direction, evs) if d is not None}) == 2
        ce = coulombic_efficiency(charge, discharge, first) if both_ways else None
        eoc = [e.stats.end_voltage_V for e in evs if charge_direction(e) == "charge"]
        eod = [e.stats.end_voltage_V for e in evs if charge_direction(e) == "discharge"]
        out.append(
            CycleSummary(
                cycle=cycle,
                charge_Ah=charge,
                discharge_Ah=discharge,
                coulombic_efficiency=ce,
                energy_in_Wh=sum(e.stats.energy_in_Wh for e in evs),
                energy_out_Wh=sum(e.stats.energy_out_Wh for e in evs),
                end_of_charge_V=eoc[-1] if eoc else None,
                end_of_discharge_V=eod[-1] if eod else None,
                first_direction=first,
            )
        )
    return out


def summarize_run(
    run_id: str,
    channel: str,
    events: list[StepEvent],
    *,
    cell_id: str = "",
    protocol: str = "",
    exit_status: str = "",
    reason: str = "",
    wall_time_s: float | None = None,
) -> RunSummary:
    ended = sorted((e for e in events if e.event == "ended"), key=lambda e: e.step_index)
    cycle_of = {ev.step_index: cycle for cycle, ev in number_cycles(ended)}
    return RunSummary(
        run_id=run_id,
        channel=channel,
        cell_id=cell_id,
        protocol=protocol,
        exit_status=exit_status,
        reason=reason,
        steps_run=len(ended),
        cell_time_s=max((e.time_s for e in ended), default=0.0),
        wall_time_s=wall_time_s,
        n_samples=sum(e.stats.n_samples for e in ended if e.stats),
        cycles=summarize_cycles(ended),
        step_ends=[
            StepEnd(
                step_index=e.step_index,
                label=e.label,
                cycle=cycle_of.get(e.step_index, e.cycle),
                reason=f"{e.reason.kind}:{e.reason.name}" if e.reason else "",
                value=e.reason.value if e.reason else None,
                duration_s=e.stats.duration_s if e.stats else 0.0,
            )
            for e in ended
        ],
    )
