"""A run that outlives its agent: rebuilt from the spool when a killed agent starts again (issue 14).

Before, a killed agent lost its RunContext: the flow's re-sent StepCommand made the restarted agent start the
run implicitly with seq 0 again (duplicates in the store) and run the step again. The spool holds every
document of a run until the recorder confirms the run complete, so a run with a RunStart and no RunStop in it
is one the agent died in: its id, its counters (next seq = highest seq + 1, samples, batches, net charge, last
cell time), the steps it ended (a re-sent StepCommand of one is answered with its end) and the step it was
running when it died. That step is not run again: the agent ends it as ``error:agent_restart`` and the flow
decides whether the run fails or goes on.

Only what the spool holds is counted: a run that was itself resumed from the store (RunStart.first_seq > 0)
with its earlier segment confirmed and dropped counts from its first_seq on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from labtwin.agent.lease import RunContext
from labtwin.agent.spool import Spool
from labtwin.documents import Outage, RunStart, RunStop, SampleBatch, StepEvent, StepStats
from labtwin.documents.codec import MalformedPayload, decode

log = logging.getLogger(__name__)


@dataclass
class RecoveredRun:
    """One run the spool shows started and never stopped."""

    start: RunStart
    run: RunContext  # counters and ended steps; start_cell_s and the lease clock are the agent's to set
    cut: StepEvent | None  # the "started" event of the step the agent died in, if one was running
    cut_stats: StepStats = field(default_factory=StepStats)
    last_sample_time_s: float = 0.0  # run time of the last thing on the record (a sample or an event)
    last_wall_s: float = 0.0  # wall time (epoch s) of the run's last spool entry: the agent's last sign of life


def _tripped(ended: StepEvent) -> bool:
    r = ended.reason
    return r is not None and (r.kind == "safety_limit" or r.name == "refused")


def step_stats_from_samples(
    rows: list[tuple[float, float | None, float | None, int]], start_time_s: float
) -> StepStats:
    """A cut step's statistics from its recorded samples ``(time_s, voltage_V, current_A, seq)``, as the sample
    loop counts them (trapezoid; the first sample's charge from the step's start). The loop counted every
    reading and only recorded ones are here, so with a sparse record rule the charge is the record's."""
    stats = StepStats()
    prev: tuple[float, float, float] | None = None
    for t, v, i, seq in rows:
        if v is None or i is None:
            continue
        dt = t - (prev[0] if prev is not None else start_time_s)
        dq = (0.5 * (i + prev[2]) if prev is not None else i) * dt / 3600.0
        if dq >= 0:
            stats.charge_Ah += dq
            stats.energy_in_Wh += dq * v
        else:
            stats.discharge_Ah -= dq
            stats.energy_out_Wh -= dq * v
        if stats.start_voltage_V is None:
            stats.start_voltage_V = v
        stats.end_voltage_V, stats.end_current_A = v, i
        stats.n_samples += 1
        stats.first_seq = seq if stats.first_seq is None else min(stats.first_seq, seq)
        stats.last_seq = seq if stats.last_seq is None else max(stats.last_seq, seq)
        stats.duration_s = max(0.0, t - start_time_s)
        prev = (t, v, i)
    return stats


def rebuild_runs(spool: Spool) -> list[RecoveredRun]:
    """The runs the spool shows started and not stopped, oldest first."""
    found: list[RecoveredRun] = []
    for run_id in spool.run_ids():
        recovered = _rebuild(spool, run_id)
        if recovered is not None:
            found.append(recovered)
    return found


def _rebuild(spool: Spool, run_id: str) -> RecoveredRun | None:
    """One run from its entries in the order written. Memory stays bounded over a weeks-long run: of each batch
    only its length is kept, its samples only while their step is open (started, not ended), and the last one."""
    start: RunStart | None = None
    lengths: dict[int, int] = {}  # seq -> samples, of the first batch written under it (as a resend picks it)
    last: SampleBatch | None = None  # the batch of the highest seq
    started: dict[int, StepEvent] = {}
    ended: dict[int, StepEvent] = {}
    open_rows: dict[int, list[tuple[float, float | None, float | None, int]]] = {}  # an open step's samples
    last_event_time_s = 0.0
    last_wall_s = 0.0
    if any(b'"kind":"run_stop"' in e.payload for e in spool.events(run_id)):
        return None  # stopped (the recorder has yet to confirm it): nothing to resume, and no batch to decode
    for entry in spool.entries(run_id):
        last_wall_s = max(last_wall_s, entry.created_s)
        if entry.seq is not None and entry.seq in lengths:
            continue  # a batch written again (a resend journalled twice): the first one counts
        try:
            doc = decode(entry.topic, entry.payload)
        except MalformedPayload as exc:  # a spool written by another labtwin version: skip what cannot be read
            log.warning("spool %s: an entry of run %s cannot be read (%s); skipped", spool.path, run_id, exc)
            continue
        if isinstance(doc, RunStop):
            return None
        if isinstance(doc, RunStart):
            start = doc  # the latest start counts (a resumed run's)
        elif isinstance(doc, SampleBatch):
            lengths[doc.seq] = len(doc)
            if last is None or doc.seq > last.seq:
                last = doc
            for k, step_index in enumerate(doc.step):
                rows = open_rows.get(step_index)
                if rows is not None:
                    rows.append((doc.time_s[k], doc.voltage_V[k], doc.current_A[k], doc.seq))
        elif isinstance(doc, Outage):  # an earlier restart: the run's time went on to its end
            last_event_time_s = max(last_event_time_s, doc.to_time_s)
        elif isinstance(doc, StepEvent):
            last_event_time_s = max(last_event_time_s, doc.time_s)
            if doc.event == "started":
                if doc.step_index not in started and doc.step_index not in ended:
                    open_rows[doc.step_index] = []
                started.setdefault(doc.step_index, doc)
            else:
                ended.setdefault(doc.step_index, doc)
                open_rows.pop(doc.step_index, None)
    if start is None:
        return None
    run = RunContext(start.run_id, start.cell_id, start.protocol, start.n_steps, start_cell_s=0.0)
    run.ended = dict(ended)
    run.next_seq = max(start.first_seq, max(lengths, default=-1) + 1)
    run.n_batches = len(lengths)
    run.n_samples = sum(lengths.values())
    last_sample_time_s = last_event_time_s
    if last is not None and len(last):
        run.capacity_Ah = last.capacity_Ah[-1]
        last_sample_time_s = max(last_sample_time_s, last.time_s[-1])
    run.last_time_s = last_sample_time_s
    tripped = [e for e in ended.values() if _tripped(e)]
    if tripped:
        run.tripped = tripped[-1].reason
    open_steps = [e for i, e in started.items() if i not in ended]
    cut = max(open_steps, key=lambda e: e.time_s) if open_steps else None
    cut_stats = StepStats()
    if cut is not None:
        cut_stats = step_stats_from_samples(open_rows.get(cut.step_index, []), cut.time_s)
    return RecoveredRun(start, run, cut, cut_stats, last_sample_time_s, last_wall_s)
