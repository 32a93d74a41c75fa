"""Where an interrupted run stands, read from the store: which steps completed, where its record ends.

The store (what the recorder wrote from the bus) is the run's record, and it
survives whatever died: the flow's process, a Prefect worker, the agent. A
run resumes at the first step that has no "ended on its condition" event:
never from step one, never repeating a completed step. The interrupted step
runs again with what is left of its time budget, after the cell's
open-circuit voltage has been measured and found inside the protocol's
window (flows.run_protocol does that part). What the interrupted step did
before the crash (its charge, from the stored samples' net charge) goes to
the agent with the resume point, so the step's statistics, and every cycle
figure made from them, count the whole step.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from labtwin.analysis.cycles import charge_increments
from labtwin.data.store import Store
from labtwin.documents import ResumePoint, StepEvent, StepStats


class ResumeState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    channel: str | None
    completed: list[StepEvent]
    point: ResumePoint
    elapsed_in_step_s: float = 0.0
    interrupted_step: int | None = None
    last_voltage_V: float | None = None


class RunRecord(BaseModel):
    """What the store says of a run id: never started, finished (how), or interrupted (how far)."""

    state: str  # "new" | "finished" | "interrupted"
    exit_status: str | None = None
    resume: ResumeState | None = None


def read_run(store: Store, run_id: str) -> RunRecord:
    start, stop = store.run_documents(run_id)
    if start is None:
        return RunRecord(state="new")
    if stop is not None:
        return RunRecord(state="finished", exit_status=stop.exit_status)
    ended = store.step_events(run_id)
    completed = [e for e in ended if e.reason is not None and e.reason.kind == "end_condition"]
    done = {e.step_index for e in completed}
    samples = store.samples(run_id)
    seqs = store.seqs(run_id)
    n = len(samples["time_s"])
    elapsed = 0.0
    interrupted = None
    last_v = None
    if n:
        steps = samples["step"].astype(int)
        started = [e.step_index for e in store.step_events(run_id, event="started") if e.step_index not in done]
        if started:
            interrupted = min(started)
            in_step = samples["time_s"][steps == interrupted]
            if len(in_step):
                elapsed = float(in_step[-1] - in_step[0])
        last_v = float(samples["voltage_V"][-1])
    point = ResumePoint(
        next_seq=(max(seqs) + 1) if seqs else 0,
        time_s=float(samples["time_s"][-1]) if n else 0.0,
        capacity_Ah=float(np.nan_to_num(samples["capacity_Ah"][-1])) if n else 0.0,
        n_samples=n,
        step_index=interrupted,
        step_stats=_stats_so_far(samples, interrupted) if interrupted is not None else None,
    )
    return RunRecord(
        state="interrupted",
        resume=ResumeState(
            run_id=run_id,
            channel=start.channel,
            completed=completed,
            point=point,
            elapsed_in_step_s=elapsed,
            interrupted_step=interrupted,
            last_voltage_V=last_v,
        ),
    )


def _stats_so_far(samples: dict[str, np.ndarray], step_index: int) -> StepStats | None:
    """What the interrupted step had done by its last stored sample, counted as the agent counts it."""
    steps = samples["step"].astype(int)
    rows = np.nonzero(steps == step_index)[0]
    if not len(rows):
        return None
    dq = charge_increments(samples["time_s"], samples["current_A"], steps, np.nan_to_num(samples["capacity_Ah"]))[rows]
    v = samples["voltage_V"][rows]
    start_s = float(samples["time_s"][rows[0] - 1]) if rows[0] > 0 else 0.0
    return StepStats(
        duration_s=float(samples["time_s"][rows[-1]]) - start_s,
        charge_Ah=float(np.sum(np.clip(dq, 0, None))),
        discharge_Ah=float(np.sum(np.clip(-dq, 0, None))),
        energy_in_Wh=float(np.sum(np.clip(dq, 0, None) * v)),
        energy_out_Wh=float(np.sum(np.clip(-dq, 0, None) * v)),
        start_voltage_V=float(v[0]),
        end_voltage_V=float(v[-1]),
        n_samples=len(rows),
    )
