"""A broker restart ends no run (issue 14): a Prefect flow, its agent and its recorder across a restart.

The broker is a Mosquitto the test starts on its own port and config, killed (SIGKILL, persistence off: every
session and retained status forgotten) or shut down gracefully (SIGINT, persistence on: the agents' last wills
reach the flow as "offline") in the middle of a cycling run, and started again on the same port. The flow's
grace period keeps the step waiting; after the reconnect it asks the agent where the step stands; the
recorder fills its gap from the agent's spool. The run must succeed with every sample stored exactly once
and every step's end stored.
"""

from __future__ import annotations

import asyncio

import pytest

from labtwin.cli.wiring import LocalLab
from labtwin.documents import Limits
from labtwin.orchestration.flows import run_protocol
from tests.helpers import sim_lab
from tests.mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.usefixtures("prefect_api")

CYCLING = """
metadata: {name: LTO cycling across a broker restart}
record: {interval_s: 2}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 600}
  - repeat: 2
    steps:
      - cc: {c_rate: -2.0, until: {voltage_V: 1.0}}
      - cc: {c_rate: 2.0, until: {voltage_V: 2.5}}
"""


@pytest.mark.parametrize(
    ("fault", "persistence"),
    [("kill", False), ("graceful", True)],
    ids=["kill-9-no-persistence", "graceful-restart-persistence"],
)
async def test_a_broker_restart_mid_run_ends_no_run_and_loses_nothing(
    fault, persistence, unique_lab, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the agent's spool and replay state go to ./labtwin-data
    proto = tmp_path / "cycling.yaml"
    proto.write_text(CYCLING)
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0), speed=400)
    broker = MosquittoProcess(tmp_path / "broker", persistence=persistence).start()
    try:
        async with LocalLab(lab, ["ch"], broker.url, str(tmp_path / "s.db")) as local:
            flow = asyncio.create_task(run_protocol(str(proto), "ch", local.url, lab=unique_lab))
            await asyncio.sleep(4.0)  # into the first discharge (the rest is 1.5 s of wall time)
            assert not flow.done(), "the run ended before the fault: make it longer"
            broker.kill() if fault == "kill" else broker.stop()
            await asyncio.sleep(1.5)
            broker.start()
            summary = await asyncio.wait_for(flow, 120)
            await local.wait_stored(summary.run_id, 60)
            stored = local.store.sample_count(summary.run_id)
            seqs = local.store.seqs(summary.run_id)
            ends = local.store.step_events(summary.run_id)
            _, stop = local.store.run_documents(summary.run_id)
            reconnects = local.agents["ch"]._bus.stats.reconnects
    finally:
        broker.kill()
    assert reconnects >= 1, "the agent never lost the broker: the fault missed"
    assert summary.exit_status == "success", summary.reason
    assert summary.steps_run == 5
    assert stop is not None and stop.exit_status == "success"
    assert stored == summary.n_samples == stop.n_samples
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "batches missing or stored twice"
    assert sorted(e.step_index for e in ends) == [0, 1, 2, 3, 4]
