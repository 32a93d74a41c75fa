"""Where an interrupted run stands, read from the store: which steps completed, where its record ends.

The store (what the recorder wrote from the bus) is the run's record, and it
survives whatever died: the flow's process, a Prefect worker, the agent. A
run resumes at the first step that has no "ended on its condition" event:
never from step one, never repeating a completed step. The interrupted step
runs again with what is left of its time budget, after the cell's
open-circuit voltage has been measured and found inside the protocol's
window (flows.run_protocol does that part).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from labtwin.data.store import Store
from labtwin.documents import ResumePoint, StepEvent


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
