"""The agent, over a real broker: safety every sample, safe state, gapless sequence numbers."""

from labtwin.cli.wiring import LocalLab
from labtwin.models import EndConditions, Limits, StepCommand, StepKind
from tests.helpers import run_steps_by_hand, sim_lab


async def test_voltage_limit_ends_the_step_within_one_sample(broker_url, unique_lab, tmp_path):
    # Channel limit 2.2 V; the step asks to charge to 2.9 V: the agent must stop it at 2.2 V.
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=2.2))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        sim = local.agents["ch"].driver
        sim.model.soc = 0.5
        cmd = StepCommand(run_id="r1", step_index=0, step=StepKind.cc, current_A=5.18e-5,
                          end=EndConditions(voltage_V=2.9, time_s=36000), sample_interval_s=5)
        ended, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "r1", [cmd])
        await local.wait_stored("r1")
        samples = local.store.samples("r1")
    reason = ended[0].reason
    assert reason.kind == "safety_limit" and reason.name == "voltage_max_V"
    v = samples["voltage_V"]
    assert (v[:-1] <= 2.2).all() and v[-1] > 2.2  # the first sample over the limit is the last one
    assert sim.mode == "off"  # safe state, put there by the agent itself
    assert stop.exit_status == "failed"


async def test_after_a_trip_the_agent_refuses_further_steps_of_that_run(broker_url, unique_lab, tmp_path):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=2.2))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        local.agents["ch"].driver.model.soc = 0.9
        trip = StepCommand(run_id="r2", step_index=0, step=StepKind.cc, current_A=5e-5,
                           end=EndConditions(time_s=36000), sample_interval_s=10)
        again = StepCommand(run_id="r2", step_index=1, step=StepKind.cc, current_A=5e-5,
                            end=EndConditions(time_s=36000), sample_interval_s=10)
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "r2", [trip, again])
    assert ended[0].reason.kind == "safety_limit"
    assert ended[1].reason.kind == "error" and ended[1].reason.name == "run_tripped"
    assert ended[1].stats.n_samples == 0


async def test_step_time_limit_is_enforced_by_the_agent(broker_url, unique_lab, tmp_path):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0, step_time_max_s=60))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        cmd = StepCommand(run_id="r3", step_index=0, step=StepKind.rest, end=EndConditions(time_s=3600), sample_interval_s=10)
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "r3", [cmd])
    assert ended[0].reason.name == "step_time_max_s"
    assert ended[0].stats.duration_s == 60


async def test_sequence_numbers_have_no_gaps_and_the_store_holds_every_sample(broker_url, unique_lab, tmp_path):
    lab = sim_lab(unique_lab, {"ch": "lco_lgps_glassy"})
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        cmds = [
            StepCommand(run_id="r4", step_index=0, step=StepKind.cc, current_A=1.2e-3, end=EndConditions(voltage_V=3.6), limits=Limits(step_time_max_s=7200), sample_interval_s=1),
            StepCommand(run_id="r4", step_index=1, step=StepKind.cv, voltage_V=3.6, end=EndConditions(current_A=2.4e-4, time_s=3600), sample_interval_s=1),
            StepCommand(run_id="r4", step_index=2, step=StepKind.rest, end=EndConditions(time_s=600), sample_interval_s=1),
        ]
        ended, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "r4", cmds)
        await local.wait_stored("r4")
        seqs = local.store.seqs("r4")
        stored = local.store.sample_count("r4")
    produced = sum(e.stats.n_samples for e in ended)
    assert seqs == list(range(stop.last_seq + 1))
    assert stored == produced == stop.n_samples > 1000
    assert [e.reason.name for e in ended] == ["voltage_V", "current_A", "time_s"]
