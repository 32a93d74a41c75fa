"""A resumed run's record goes on from seq N: the twin must follow it, not wait for batches 0..N-1 forever."""

from __future__ import annotations

from labtwin.documents import RunStart, SampleBatch, StepEvent, StepKind
from labtwin.twin.cell_twin import CellTwin

RUN = "r-resumed"


def _start(first_seq: int) -> RunStart:
    return RunStart(run_id=RUN, lab="t", channel="ch1", cell_id="c1", protocol="p", n_steps=1, first_seq=first_seq)


def _started(t: float) -> StepEvent:
    return StepEvent(run_id=RUN, channel="ch1", step_index=0, cycle=1, step=StepKind.cc, event="started", time_s=t)


def _batch(seq: int, n: int = 5) -> SampleBatch:
    t0 = seq * n * 10.0
    return SampleBatch(
        run_id=RUN,
        channel="ch1",
        seq=seq,
        time_s=[t0 + 10.0 * k for k in range(n)],
        voltage_V=[1.55] * n,
        current_A=[-1e-5] * n,
        capacity_Ah=[-1e-5 * (t0 + 10.0 * k) / 3600 for k in range(n)],
        temperature_C=[None] * n,
        step=[0] * n,
        cycle=[1] * n,
    )


def test_a_twin_that_followed_the_run_goes_on_after_its_resume():
    twin = CellTwin("c1", lambda: None)
    twin.feed(_start(0))
    twin.feed(_started(0.0))
    for seq in range(3):
        twin.feed(_batch(seq))
    assert twin.state.time_s == _batch(2).time_s[-1]
    # the agent died after batch 2; the resumed agent numbers its record from 3 and starts the step again
    twin.feed(_start(3))
    twin.feed(_started(_batch(3).time_s[0]))
    for seq in (3, 4):
        twin.feed(_batch(seq))
    assert twin.state.time_s == _batch(4).time_s[-1]
    assert twin._pending == []


def test_a_twin_that_joins_at_the_resume_follows_from_its_first_seq():
    twin = CellTwin("c1", lambda: None)
    twin.feed(_start(7))
    twin.feed(_started(_batch(7).time_s[0]))
    twin.feed(_batch(7))
    assert twin.state.time_s == _batch(7).time_s[-1]
    assert twin.state.run_id == RUN
