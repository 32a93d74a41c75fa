"""The agent checks every command against its channel before applying it (issue 14).

Over a real broker (the embedded one, via LocalLab): the issue's three commands (a cv at 10 V and a cc of
50 mA on a channel limited to 3.8 V / 5 mA, a step read every 600 s) are refused with one-line reasons and the
simulated instrument never sources; a legitimate step still runs. Then admission unit by unit, per technique.
"""

from __future__ import annotations

import pytest

from labtwin.agent.admission import admit
from labtwin.agent.techniques import compliance_V
from labtwin.cli.wiring import LocalLab
from labtwin.documents import (
    DEFAULT_SAMPLE_INTERVAL_MAX_S,
    EisSettings,
    EndConditions,
    GittSettings,
    Limits,
    StepCommand,
    StepKind,
    SweepSettings,
)
from tests.helpers import run_steps_by_hand, sim_lab

CHANNEL = Limits(voltage_min_V=1.9, voltage_max_V=3.8, current_max_A=0.005)
"""The issue's channel: 3.8 V / 5 mA (the demo lab's ch2, an LCO cell)."""


def step(kind: StepKind, **fields) -> StepCommand:
    fields.setdefault("end", EndConditions(time_s=600))
    fields.setdefault("sample_interval_s", 1.0)
    return StepCommand(run_id="r", step_index=0, step=kind, **fields)


# ---------------------------------------------------------------------------------------------- over the bus

ISSUE_CASES = {
    "cv_10V": (step(StepKind.cv, voltage_V=10.0), "cv voltage_V 10 V is above voltage_max_V 3.8 V"),
    "cc_50mA": (step(StepKind.cc, current_A=0.05), "cc current_A 0.05 A is beyond current_max_A 0.005 A"),
    "interval_600s": (
        step(StepKind.cc, current_A=1e-3, end=EndConditions(time_s=36000), sample_interval_s=600),
        "sample_interval_s 600 s is longer than the channel's sample_interval_max_s 10 s",
    ),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
async def test_the_issues_commands_are_refused_and_the_instrument_never_sources(embedded_broker, tmp_path, case):
    cmd, says = ISSUE_CASES[case]
    lab = sim_lab("admit", {"ch": "lco_lgps_glassy"}, CHANNEL)
    then = step(StepKind.rest, end=EndConditions(time_s=60))
    then = then.model_copy(update={"run_id": "r1", "step_index": 1})
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db")) as local:
        sim = local.agents["ch"].driver
        soc = sim.model.soc
        modes: list[str] = []
        set_current, set_voltage = sim.set_current, sim.set_voltage
        sim.set_current = lambda *a: (modes.append("current"), set_current(*a))[1]
        sim.set_voltage = lambda *a: (modes.append("voltage"), set_voltage(*a))[1]
        ended, stop = await run_steps_by_hand(
            local.url, "admit", "ch", "r1", [cmd.model_copy(update={"run_id": "r1"}), then]
        )
        await local.wait_stored("r1")
        stored = local.store.sample_count("r1")
        mode = sim.mode
    reason = ended[0].reason
    assert reason.kind == "error" and reason.name == "refused"
    assert says in reason.message and "\n" not in reason.message
    assert ended[0].stats.n_samples == 0 and stored == 0
    assert modes == [] and mode in ("off", "open_circuit") and sim.model.soc == soc  # never sourced
    # The run fails as on a trip: the next step is refused with the reason, the run stops failed.
    assert ended[1].reason.name == "run_tripped" and says in ended[1].reason.message
    assert stop.exit_status == "failed" and stop.n_samples == 0


async def test_a_legitimate_step_still_runs(embedded_broker, tmp_path):
    lab = sim_lab("admit", {"ch": "lco_lgps_glassy"}, CHANNEL)
    cmd = StepCommand(
        run_id="ok", step_index=0, step=StepKind.cc, current_A=1e-3, end=EndConditions(time_s=600), sample_interval_s=10
    )
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db")) as local:
        ended, stop = await run_steps_by_hand(local.url, "admit", "ch", "ok", [cmd])
    assert ended[0].reason.kind == "end_condition" and ended[0].reason.name == "time_s"
    assert ended[0].stats.n_samples == 60 and stop.exit_status == "success"


# ---------------------------------------------------------------------------------------------- admission


def refused(cmd: StepCommand, limits: Limits = CHANNEL) -> str:
    reason = admit(cmd, limits)
    assert reason is not None and reason.kind == "error" and reason.name == "refused"
    assert "\n" not in reason.message
    return reason.message


def test_rest_is_admitted_and_its_sample_interval_bounded():
    assert admit(step(StepKind.rest, sample_interval_s=10), CHANNEL) is None
    assert "sample_interval_s 10.5 s" in refused(step(StepKind.rest, sample_interval_s=10.5))


def test_cc_current_is_a_magnitude_within_current_max():
    assert admit(step(StepKind.cc, current_A=0.005), CHANNEL) is None
    assert admit(step(StepKind.cc, current_A=-0.005), CHANNEL) is None
    assert "current_A -0.006 A" in refused(step(StepKind.cc, current_A=-0.006))


def test_an_end_voltage_beyond_the_window_is_not_refused_the_limit_trips_instead():
    assert admit(step(StepKind.cc, current_A=1e-3, end=EndConditions(voltage_V=4.5, time_s=60)), CHANNEL) is None


def test_cv_setpoint_inside_the_window_inclusive():
    assert admit(step(StepKind.cv, voltage_V=3.8), CHANNEL) is None
    assert admit(step(StepKind.cv, voltage_V=1.9), CHANNEL) is None
    assert "below voltage_min_V 1.9 V" in refused(step(StepKind.cv, voltage_V=1.5))
    assert "cv current_A 0.01 A" in refused(step(StepKind.cv, voltage_V=3.6, current_A=0.01))


def test_cccv_checks_both_its_current_and_its_voltage():
    assert admit(step(StepKind.cccv, current_A=1e-3, voltage_V=3.6), CHANNEL) is None
    assert "cccv voltage_V 4.2 V" in refused(step(StepKind.cccv, current_A=1e-3, voltage_V=4.2))
    assert "cccv current_A 0.02 A" in refused(step(StepKind.cccv, current_A=0.02, voltage_V=3.6))


def test_gitt_pulse_current_within_current_max():
    gitt = GittSettings(pulse_s=60, relax_s=600)
    assert admit(step(StepKind.gitt, current_A=1e-3, gitt=gitt), CHANNEL) is None
    assert "gitt current_A 0.05 A" in refused(step(StepKind.gitt, current_A=0.05, gitt=gitt))


def test_cp_power_within_the_envelope():
    p_max = 3.8 * 0.005
    assert admit(step(StepKind.cp, power_W=-p_max), CHANNEL) is None
    assert "cp power_W 0.02 W is beyond 0.019 W" in refused(step(StepKind.cp, power_W=0.02))


def test_cyclic_voltammetry_vertices_inside_the_window_and_its_dwell_bounded():
    ok = SweepSettings(start_V=3.0, vertex_1_V=3.8, vertex_2_V=2.0, scan_rate_V_s=1e-3)
    assert admit(step(StepKind.cyclic_voltammetry, sweep=ok), CHANNEL) is None
    wide = ok.model_copy(update={"vertex_2_V": 0.5})
    assert "cyclic_voltammetry vertex_2_V 0.5 V" in refused(step(StepKind.cyclic_voltammetry, sweep=wide))
    slow = ok.model_copy(update={"scan_rate_V_s": 1e-5})  # 1 mV steps at 10 uV/s: 100 s between checks
    assert "per potential step" in refused(step(StepKind.cyclic_voltammetry, sweep=slow))


def test_eis_is_bounded_by_its_sample_interval_only():
    assert admit(step(StepKind.eis, eis=EisSettings()), CHANNEL) is None
    assert "sample_interval_s 60 s" in refused(step(StepKind.eis, eis=EisSettings(), sample_interval_s=60))


def test_the_channel_sets_its_own_sample_interval_bound_and_a_step_may_only_tighten_it():
    slow_channel = CHANNEL.model_copy(update={"sample_interval_max_s": 60.0})
    cmd = step(StepKind.cc, current_A=1e-3, sample_interval_s=30)
    assert admit(cmd, slow_channel) is None
    assert DEFAULT_SAMPLE_INTERVAL_MAX_S == 10 and "sample_interval_max_s 10 s" in refused(cmd)
    tight = slow_channel.tighten(Limits(sample_interval_max_s=20))
    assert tight.sample_interval_max_s == 20 and "sample_interval_max_s 20 s" in refused(cmd, tight)
    assert slow_channel.violations_of(Limits(sample_interval_max_s=120)) == [
        "sample_interval_max_s 120.0 is above the channel's 60.0"
    ]


def test_a_channel_without_a_limit_of_a_kind_checks_nothing_of_that_kind():
    assert admit(step(StepKind.cv, voltage_V=10.0, current_A=1.0), Limits()) is None
    assert admit(step(StepKind.cp, power_W=5.0), Limits(current_max_A=1e-3)) is None


def test_the_step_limits_tighten_the_window_the_setpoint_is_checked_against():
    tight = CHANNEL.tighten(Limits(voltage_max_V=3.6))
    assert "above voltage_max_V 3.6 V" in refused(step(StepKind.cv, voltage_V=3.7), tight)


def test_a_current_sources_compliance_is_never_more_than_the_margin_beyond_the_channel():
    # The channel's limit is the check, the compliance the backstop 2 % beyond it, the step's limits only tighten.
    for limits in (CHANNEL, CHANNEL.tighten(Limits(voltage_max_V=3.5, voltage_min_V=2.5))):
        up, down = compliance_V(limits, 1e-3), compliance_V(limits, -1e-3)
        assert limits.voltage_max_V < up <= CHANNEL.voltage_max_V * 1.02 + 1e-12
        assert CHANNEL.voltage_min_V * 0.98 - 1e-12 <= down < limits.voltage_min_V
