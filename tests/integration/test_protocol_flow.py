"""End to end: a protocol file runs as a Prefect flow over MQTT on simulated channels and is stored."""

import asyncio

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from labtwin.cli.wiring import LocalLab
from labtwin.documents import Limits
from labtwin.orchestration.flows import ChannelUnavailable, run_protocol
from tests.helpers import sim_lab

pytestmark = pytest.mark.usefixtures("prefect_api")

SHORT_LTO = """
metadata: {name: short LTO cycling}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 60}
  - repeat: 2
    steps:
      - cc: {c_rate: -2.0, until: {voltage_V: 1.0}}
      - cc: {c_rate: 2.0, until: {voltage_V: 2.5}}
"""


async def test_protocol_runs_as_a_flow_with_one_task_run_per_step_and_every_sample_stored(
    broker_url, unique_lab, tmp_path
):
    proto = tmp_path / "short.yaml"
    proto.write_text(SHORT_LTO)
    lab = sim_lab(unique_lab, {"ch1": "lto_bare_thinfilm", "ch2": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["ch1", "ch2"], broker_url, str(tmp_path / "s.db")) as local:
        states = await asyncio.gather(
            *(run_protocol(str(proto), ch, local.url, lab=unique_lab, return_state=True) for ch in ("ch1", "ch2"))
        )
        summaries = [await s.result() for s in states]
        for s in summaries:
            await local.wait_stored(s.run_id)
        stored = {s.run_id: local.store.sample_count(s.run_id) for s in summaries}
        runs = {r.run_id: r for r in local.store.runs()}
    for state, summary in zip(states, summaries):
        assert summary.exit_status == "success" and summary.steps_run == 5
        assert stored[summary.run_id] == summary.n_samples == runs[summary.run_id].reported_samples
        assert [c.cycle for c in summary.cycles] == [1, 2]
        assert all(0.95 < c.coulombic_efficiency <= 1.0 for c in summary.cycles)
        async with get_client() as client:
            tasks = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
        assert len(tasks) == 5 and all(t.state.is_completed() for t in tasks)
        assert sorted(t.name for t in tasks)[0].startswith("000 c0 rest")


async def test_a_tripped_limit_fails_the_run_and_stops_the_flow_early(embedded_broker, unique_lab, tmp_path):
    proto = tmp_path / "short.yaml"
    proto.write_text(SHORT_LTO.replace("until: {voltage_V: 2.5", "until: {time_s: 20000"))
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0))
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db")) as local:
        # Charging on time alone: the fully delithiated cell runs away past the 3.0 V channel limit
        # (the source's own backstop is 2 % beyond it), so the agent trips voltage_max_V on the first
        # charge and the flow stops there.
        summary = await run_protocol(str(proto), "ch", local.url, lab=unique_lab)
    assert summary.exit_status == "failed"
    assert summary.step_ends[-1].reason == "safety_limit:voltage_max_V"
    assert summary.steps_run == 3


async def test_a_flow_for_a_channel_without_an_agent_fails_fast_with_the_fix(embedded_broker, unique_lab):
    with pytest.raises(ChannelUnavailable, match="labtwin agent --channel nobody"):
        await run_protocol("lto_formation", "nobody", embedded_broker.url, lab=unique_lab)
