"""The agent, over a real broker: safety every sample, safe state, gapless sequence numbers."""

import asyncio

from labtwin.cli.wiring import LocalLab
from labtwin.documents import EndConditions, Limits, StepCommand, StepKind
from tests.helpers import run_steps_by_hand, sim_lab


async def test_voltage_limit_ends_the_step_within_one_sample(broker_url, unique_lab, tmp_path):
    # Channel limit 2.2 V; the step asks to charge to 2.9 V: the agent must stop it at 2.2 V.
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=2.2))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        sim = local.agents["ch"].driver
        sim.model.soc = 0.5
        cmd = StepCommand(
            run_id="r1",
            step_index=0,
            step=StepKind.cc,
            current_A=5.18e-5,
            end=EndConditions(voltage_V=2.9, time_s=36000),
            sample_interval_s=5,
        )
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
        trip = StepCommand(
            run_id="r2",
            step_index=0,
            step=StepKind.cc,
            current_A=5e-5,
            end=EndConditions(time_s=36000),
            sample_interval_s=10,
        )
        again = StepCommand(
            run_id="r2",
            step_index=1,
            step=StepKind.cc,
            current_A=5e-5,
            end=EndConditions(time_s=36000),
            sample_interval_s=10,
        )
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "r2", [trip, again])
    assert ended[0].reason.kind == "safety_limit"
    assert ended[1].reason.kind == "error" and ended[1].reason.name == "run_tripped"
    assert ended[1].stats.n_samples == 0


async def test_step_time_limit_is_enforced_by_the_agent(broker_url, unique_lab, tmp_path):
    lab = sim_lab(
        unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0, step_time_max_s=60)
    )
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        cmd = StepCommand(
            run_id="r3", step_index=0, step=StepKind.rest, end=EndConditions(time_s=3600), sample_interval_s=10
        )
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "r3", [cmd])
    assert ended[0].reason.name == "step_time_max_s"
    assert ended[0].stats.duration_s == 60


async def test_sequence_numbers_have_no_gaps_and_the_store_holds_every_sample(broker_url, unique_lab, tmp_path):
    lab = sim_lab(unique_lab, {"ch": "lco_lgps_glassy"})
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        cmds = [
            StepCommand(
                run_id="r4",
                step_index=0,
                step=StepKind.cc,
                current_A=1.2e-3,
                end=EndConditions(voltage_V=3.6),
                limits=Limits(step_time_max_s=7200),
                sample_interval_s=1,
            ),
            StepCommand(
                run_id="r4",
                step_index=1,
                step=StepKind.cv,
                voltage_V=3.6,
                end=EndConditions(current_A=2.4e-4, time_s=3600),
                sample_interval_s=1,
            ),
            StepCommand(
                run_id="r4", step_index=2, step=StepKind.rest, end=EndConditions(time_s=600), sample_interval_s=1
            ),
        ]
        ended, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "r4", cmds)
        await local.wait_stored("r4")
        seqs = local.store.seqs("r4")
        stored = local.store.sample_count("r4")
    produced = sum(e.stats.n_samples for e in ended)
    assert seqs == list(range(stop.last_seq + 1))
    assert stored == produced == stop.n_samples > 1000
    assert [e.reason.name for e in ended] == ["voltage_V", "current_A", "time_s"]


async def test_a_run_holds_its_channel_and_an_abandoned_one_gives_way(broker_url, unique_lab, tmp_path):
    """The agent is the channel's lease: a second run is refused while the first has a step running or its flow
    spoke within lease_grace_s; once the first run's flow has been quiet that long (killed), the next run starts."""
    import asyncio

    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import ChannelStatus, RunStart, RunStop, StartRun, StepEvent
    from tests.helpers import wait_doc

    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        local.agents["ch"].lease_grace_s = 1.0
        async with Bus(local.url) as bus:
            events = await bus.subscribe(
                [busmod.topic(unique_lab, "ch", "event"), busmod.topic(unique_lab, "ch", "status")]
            )
            cmd = busmod.topic(unique_lab, "ch", "cmd")
            await bus.publish(cmd, StartRun(run_id="first", channel="ch", cell_id="c", protocol="p", n_steps=1))
            await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == "first")
            await bus.publish(
                cmd,
                StepCommand(
                    run_id="first", step_index=0, step=StepKind.rest, end=EndConditions(time_s=60), sample_interval_s=10
                ),
            )
            await wait_doc(events, lambda d: isinstance(d, StepEvent) and d.event == "ended" and d.run_id == "first")
            # The first run's flow goes quiet (as if killed) right after its step: within the grace it keeps the channel.
            await bus.publish(cmd, StartRun(run_id="second", channel="ch", cell_id="c", protocol="p", n_steps=1))
            refused = await wait_doc(
                events, lambda d: isinstance(d, ChannelStatus) and d.message.startswith("refused run second")
            )
            assert refused.run_id == "first"
            await asyncio.sleep(1.2)
            await bus.publish(cmd, StartRun(run_id="second", channel="ch", cell_id="c", protocol="p", n_steps=1))
            stop = await wait_doc(events, lambda d: isinstance(d, RunStop) and d.run_id == "first")
            assert stop.exit_status == "aborted" and stop.reason.startswith("abandoned")
            await wait_doc(events, lambda d: isinstance(d, RunStart) and d.run_id == "second")


async def test_a_trip_delay_rides_through_a_short_excursion_but_not_the_channels_hard_limit(
    broker_url, unique_lab, tmp_path
):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=2.6))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        local.agents["ch"].driver.model.soc = 0.5
        charge = dict(
            step=StepKind.cc, current_A=5.18e-5, end=EndConditions(voltage_V=2.9, time_s=36000), sample_interval_s=10
        )
        # Protocol limit 1.8 V with a 60 s delay: the step goes on 60 s of samples past 1.8 V, then trips.
        delayed = StepCommand(run_id="d1", step_index=0, limits=Limits(voltage_max_V=1.8, trip_delay_s=60), **charge)
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "d1", [delayed])
        await local.wait_stored("d1")
        samples = local.store.samples("d1")
        over = samples["time_s"][samples["voltage_V"] > 1.8]
        assert ended[0].reason.name == "voltage_max_V" and "trip delay 60 s" in ended[0].reason.message
        assert over[-1] - over[0] == 60
        # The channel's 2.6 V is a hard limit: a protocol's delay does not stretch it.
        local.agents["ch"].driver.model.soc = 0.97
        hard = StepCommand(run_id="d2", step_index=0, limits=Limits(trip_delay_s=3600), **charge)
        ended, _ = await run_steps_by_hand(local.url, unique_lab, "ch", "d2", [hard])
        await local.wait_stored("d2")
        v = local.store.samples("d2")["voltage_V"]
    assert ended[0].reason.name == "voltage_max_V" and (v > 2.6).sum() == 1


async def test_a_pause_action_holds_the_cell_at_open_circuit_and_a_limit_still_exceeded_there_stops(
    broker_url, unique_lab, tmp_path
):
    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import ChannelStatus, RunStart, RunStop, StartRun, StepEvent, StopRun
    from tests.helpers import wait_doc

    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        local.agents["ch"].driver.model.soc = 0.5
        async with Bus(local.url) as bus:
            sub = await bus.subscribe(
                [busmod.topic(unique_lab, "ch", "event"), busmod.topic(unique_lab, "ch", "status")]
            )
            cmd = busmod.topic(unique_lab, "ch", "cmd")
            await bus.publish(cmd, StartRun(run_id="p1", channel="ch", cell_id="c", protocol="p", n_steps=1))
            await wait_doc(sub, lambda d: isinstance(d, RunStart))
            await bus.publish(
                cmd,
                StepCommand(
                    run_id="p1",
                    step_index=0,
                    step=StepKind.cc,
                    current_A=5.18e-5,
                    end=EndConditions(voltage_V=2.9, time_s=36000),
                    sample_interval_s=10,
                    limits=Limits(voltage_max_V=1.8, action="pause"),
                ),
            )
            paused = await wait_doc(
                sub, lambda d: isinstance(d, ChannelStatus) and d.message.startswith("paused by safety")
            )
            assert paused.state.value == "paused" and "voltage_max_V" in paused.message
            assert paused.current_A == 0.0  # at open circuit, not the charge current read before the pause
            await asyncio.sleep(0.5)  # the paused step keeps sampling at open circuit (and does not end)
            await bus.publish(cmd, StopRun(run_id="p1", exit_status="aborted", reason="test over"))
            ended = await wait_doc(sub, lambda d: isinstance(d, StepEvent) and d.event == "ended")
            await wait_doc(sub, lambda d: isinstance(d, RunStop))
            assert ended.reason.kind == "aborted"
            await local.wait_stored("p1")
            s = local.store.samples("p1")
            after = s["time_s"] > s["time_s"][s["voltage_V"] > 1.8][0]
            assert after.sum() >= 3 and (s["current_A"][after] == 0).all()
            # The next run's steps count their time from zero again (a step aborted while paused once left the
            # agent counting every later sample as paused: a 600 s rest never ended).
            rest, _ = await run_steps_by_hand(
                local.url,
                unique_lab,
                "ch",
                "p3",
                [
                    StepCommand(
                        run_id="p3",
                        step_index=0,
                        step=StepKind.rest,
                        end=EndConditions(time_s=600),
                        sample_interval_s=10,
                    )
                ],
            )
            assert rest[0].reason.name == "time_s" and rest[0].stats.duration_s == 600
            # A rest whose open-circuit voltage is already beyond the limit: pausing cannot help, so it stops.
            ended, stop = await run_steps_by_hand(
                local.url,
                unique_lab,
                "ch",
                "p2",
                [
                    StepCommand(
                        run_id="p2",
                        step_index=0,
                        step=StepKind.rest,
                        end=EndConditions(time_s=600),
                        sample_interval_s=10,
                        limits=Limits(voltage_max_V=1.5, action="pause"),
                    )
                ],
            )
    assert ended[0].reason.kind == "safety_limit" and stop.exit_status == "failed"


async def test_a_resumed_step_ends_on_its_capacity_counting_the_charge_before_the_crash(
    broker_url, unique_lab, tmp_path
):
    """cc until 20 uAh, cut by a crash at 12 uAh: run on, it must stop after 8 uAh more, not 20."""
    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import ResumePoint, RunStart, StartRun, StepEvent, StepStats, StopRun
    from tests.helpers import wait_doc

    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0))
    before = StepStats(duration_s=864.0, charge_Ah=12e-6, n_samples=10, first_seq=0, last_seq=0)
    resume = ResumePoint(next_seq=1, time_s=864.0, capacity_Ah=12e-6, n_samples=10, step_index=0, step_stats=before)
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        local.agents["ch"].driver.model.soc = 0.3
        step = StepCommand(
            run_id="r-cap",
            step_index=0,
            step=StepKind.cc,
            current_A=5e-5,
            end=EndConditions(capacity_Ah=20e-6, time_s=36000),
            sample_interval_s=1,
        )
        async with Bus(local.url) as bus:
            sub = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
            cmd_topic = busmod.topic(unique_lab, "ch", "cmd")
            start = StartRun(run_id="r-cap", channel="ch", cell_id="c", protocol="p", n_steps=1, resume=resume)
            await bus.publish(cmd_topic, start)
            started = await wait_doc(sub, lambda d: isinstance(d, RunStart) and d.run_id == "r-cap")
            await bus.publish(cmd_topic, step)
            ended = await wait_doc(sub, lambda d: isinstance(d, StepEvent) and d.event == "ended")
            await bus.publish(cmd_topic, StopRun(run_id="r-cap", exit_status="success"))
    assert started.first_seq == 1
    assert ended.reason.kind == "end_condition" and ended.reason.name == "capacity_Ah"
    assert abs(ended.stats.charge_Ah - 20e-6) < 0.5e-6  # the whole step's charge: 12 before + ~8 after


async def test_a_nan_reading_trips_the_step_and_is_stored_as_a_missing_value(broker_url, unique_lab, tmp_path):
    """An instrument that returns no number: the agent trips on it, and the batch that carries the tripping
    sample reaches the store (the reading as NULL) instead of being refused for its NaN, so no seq is lost."""
    import math

    from labtwin.devices.potentiostat import Reading

    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}, Limits(voltage_min_V=0.5, voltage_max_V=3.0))
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        driver = local.agents["ch"].driver
        real_read = driver.read
        reads = 0

        def read() -> Reading:
            nonlocal reads
            reads += 1
            reading = real_read()
            return Reading(math.nan, reading.current_A, reading.temperature_C) if reads == 30 else reading

        driver.read = read
        cmd = StepCommand(
            run_id="r-nan", step_index=0, step=StepKind.rest, end=EndConditions(time_s=3600), sample_interval_s=10
        )
        ended, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "r-nan", [cmd])
        await local.wait_stored("r-nan")
        samples = local.store.samples("r-nan")
    assert ended[0].reason.kind == "safety_limit" and ended[0].reason.name == "invalid_reading"
    assert len(samples["voltage_V"]) == stop.n_samples
    assert math.isnan(samples["voltage_V"][-1]) and not any(math.isnan(v) for v in samples["voltage_V"][:-1])
    assert local.recorder.bus.stats.malformed == 0
