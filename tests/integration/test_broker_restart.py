"""A broker that restarts mid-run: the agent's outbox re-sends, the run completes, nothing it produced is lost."""

import asyncio

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.wiring import LocalLab
from labtwin.documents import EndConditions, Limits, RunStop, StepCommand, StepKind
from tests.helpers import run_steps_by_hand, sim_lab, wait_doc


async def test_run_survives_a_broker_restart_and_the_store_gets_every_sample(unique_lab, tmp_path):
    broker = await EmbeddedBroker().start()
    # Real time x 2000 so the run spans the restart: 2 h of cell time at 1 s sampling ~ 3.6 s wall.
    lab = sim_lab(unique_lab, {"ch": "lco_lgps_glassy"}, Limits(voltage_min_V=1.9, voltage_max_V=3.8), speed=2000)
    cmd = StepCommand(
        run_id="rs", step_index=0, step=StepKind.rest, end=EndConditions(time_s=7200), sample_interval_s=1
    )
    try:
        async with LocalLab(lab, ["ch"], broker.url, str(tmp_path / "s.db")) as local:

            async def restart():
                await asyncio.sleep(1.0)
                await broker.stop()
                await asyncio.sleep(0.5)
                await broker.start()  # same port, fresh broker: all sessions gone

            async with Bus(local.url, "watcher", persistent=True) as bus:
                sub = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
                # Drive the step, restarting the broker while it runs.
                driver = asyncio.create_task(run_steps_by_hand(local.url, unique_lab, "ch", "rs", [cmd]))
                await restart()
                try:
                    ended, stop = await asyncio.wait_for(driver, 60)
                except TimeoutError:
                    # The hand driver's own subscription may have missed events across the restart;
                    # the run documents still arrive on a persistent subscriber.
                    stop = await wait_doc(sub, lambda d: isinstance(d, RunStop) and d.run_id == "rs", 60)
            await local.wait_stored("rs", 60)
            stored = local.store.sample_count("rs")
            reconnects = local.agents["ch"]._bus.stats.reconnects
    finally:
        await broker.stop()
    assert reconnects >= 1
    assert stop.n_samples == 7200
    assert stored == stop.n_samples
