"""Run summaries from step events alone: per-cycle capacities, Coulombic efficiency, end voltages.

Every StepEvent "ended" carries the agent's own bookkeeping of the step
(charge in, charge out, energy, end voltage) and the electrochemical cycle
the step belongs to, so a summary needs no samples: the flow can report it
the moment the run ends, and the store can rebuild it. What a cycle is, and
its capacities and Coulombic efficiency, are defined once, in
labtwin.analysis.cycles; this module only arranges them into a run's report.
"""

from __future__ import annotations

from pydantic import BaseModel

from labtwin.analysis.cycles import CycleSummary, summarize_cycles
from labtwin.documents import StepEvent

__all__ = ["CycleSummary", "RunSummary", "StepEnd", "summarize_cycles", "summarize_run"]


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
                cycle=e.cycle,
                reason=f"{e.reason.kind}:{e.reason.name}" if e.reason else "",
                value=e.reason.value if e.reason else None,
                duration_s=e.stats.duration_s if e.stats else 0.0,
            )
            for e in ended
        ],
    )
