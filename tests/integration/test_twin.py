"""The twin as a user meets it: following dry-runs over the bus, and replaying recorded files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labtwin.cli import app

pytestmark = pytest.mark.usefixtures("prefect_api")
runner = CliRunner()
DATA = Path(__file__).resolve().parents[1] / "data"

CERAMIC_CHECKUPS = """
metadata: {name: ceramic check-ups, chemistry: LCO|LGPS|Li-In, nominal_capacity_Ah: 1.02e-3}
record: {interval_s: 300}
safety: {voltage_min_V: 1.8, voltage_max_V: 3.75}
method:
  - repeat: 6
    steps:
      - cc: {c_rate: 0.2, until: {voltage_V: 3.68}}
      - cc: {c_rate: -0.2, until: {voltage_V: 1.88}}
      - cc: {c_rate: 0.2, until: {voltage_V: 3.68}}
      - rest: {duration_s: 600}
      - eis: {f_start_Hz: 1000000, f_end_Hz: 0.1, points_per_decade: 6}
      - cc: {c_rate: -0.2, until: {voltage_V: 1.88}}
"""


@pytest.mark.parametrize(("cell", "flagged"), [("lco-lgps-ceramic", True), ("lco-lgps-glassy-ceramic", False)])
def test_twin_flags_impedance_growth_on_ceramic_lco_during_a_dry_run_and_not_on_glassy(tmp_path, cell, flagged):
    protocol = tmp_path / "checkups.yaml"
    protocol.write_text(CERAMIC_CHECKUPS)
    result = runner.invoke(app, ["dryrun", str(protocol), "--sim", cell, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    growth = [a for a in report["anomalies"] if a["kind"] == "impedance_growth"]
    assert bool(growth) is flagged, report["anomalies"]
    if flagged:
        # The charge-transfer arc (R3, the slowest) grows first: the sqrt law of seed 003's ceramic cell.
        assert growth[0]["message"].startswith("R3") and growth[0]["figures"]["growth"] > 0.3
    others = {a["kind"] for a in report["anomalies"]} - {"impedance_growth"}
    assert not others, report["anomalies"]


def test_replay_of_a_biologic_mpr_runs_and_reports_its_cycles_steps_and_spectra():
    result = runner.invoke(app, ["replay", str(DATA / "cycling" / "biol.mpr"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    replayed = report["replayed"]
    assert replayed["format"] == "biologic-mpr" and replayed["samples"] == 23561
    assert replayed["impedance_spectra"] == 5
    # GITT-like charging with impedance check-ups: one cycle opened, never completed, so no efficiency.
    assert replayed["steps"] >= 20 and replayed["cycles"] == 1
    assert replayed["cycle_table"][0]["coulombic_efficiency"] is None
    assert 21.0 < replayed["cell_time_s"] / 3600 < 21.3
    assert report["anomalies"] == []  # a healthy cell charging in GITT-like steps: nothing to flag


def test_replay_refuses_what_it_cannot_read(tmp_path):
    bad = tmp_path / "data.txt"
    bad.write_text("1,2,3\n")
    result = runner.invoke(app, ["replay", str(bad)])
    assert result.exit_code == 2 and "unknown recording format" in result.output
    csv_file = tmp_path / "samples.csv"
    csv_file.write_text("time_s,voltage_V\n0,1\n")
    result = runner.invoke(app, ["replay", str(csv_file)])
    assert result.exit_code == 2 and "current_A" in result.output and "step" in result.output


def test_a_stop_policy_ends_the_run_safely_when_the_twin_flags_the_anomaly(tmp_path):
    """anomalies: {oscillation_onset: stop}: the twin sends StopRun, the agent ends the step within a sample."""
    protocol = tmp_path / "stop.yaml"
    protocol.write_text("""
metadata: {name: stop on oscillation, chemistry: LTO|Li, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.05, voltage_max_V: 3.1}
anomalies: {oscillation_onset: stop}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -0.1, until: {voltage_V: 0.1}}
  - cc: {c_rate: 0.1, until: {voltage_V: 3.0}}
""")
    # At max speed: the dry-run's simulated channel runs at most a batch ahead of the twin that follows it,
    # and waits while the twin's stop reaches it (labtwin/twin/pacing.py), so the stop lands within ten
    # samples of the onset in cell time, as it lands within a sample in real time on a lab's channel
    # (bench/anomaly_latency.py, p99 under 50 ms). Unpaced, it landed anywhere after the ~1.9 h onset.
    result = runner.invoke(app, ["dryrun", str(protocol), "--sim", "lto-thin-film", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exit_status"] == "aborted", report["reason"]
    (anomaly,) = report["anomalies"]
    assert anomaly["kind"] == "oscillation_onset" and anomaly["action"] == "stop"
    discharge = report["step_ends"][1]
    assert discharge["reason"] == "aborted:abort"
    stop_delay_s = discharge["duration_s"] + 60 - (anomaly["detected_time_s"] or anomaly["time_s"])
    assert 0 <= stop_delay_s <= 10 * 10, stop_delay_s  # ten samples of 10 s
    assert len(report["step_ends"]) == 2  # the charge never ran


PAUSE_ON_OSCILLATION = """
metadata: {name: pause on oscillation, chemistry: LTO|Li, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.05, voltage_max_V: 3.1}
anomalies: {oscillation_onset: pause}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -0.1, until: {voltage_V: 0.1}}
  - cc: {c_rate: 0.1, until: {voltage_V: 3.0}}
"""


async def test_a_pause_policy_holds_the_cell_at_open_circuit_until_resumed(embedded_broker, unique_lab, tmp_path):
    """The twin pauses the run; the agent holds open circuit, still sampling; `resume` lets the step finish."""
    import asyncio

    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.cli.wiring import LocalLab
    from labtwin.documents import ChannelState, ChannelStatus, Limits, ResumeRun
    from labtwin.orchestration.flows import run_protocol
    from tests.helpers import sim_lab, wait_doc

    proto = tmp_path / "pause.yaml"
    proto.write_text(PAUSE_ON_OSCILLATION)
    # At max speed: the simulated channel waits for its twin (labtwin/twin/pacing.py); unpaced, the compiled
    # electrode ran ahead of the twin and the onset's pause landed after the half cycle had ended.
    lab = sim_lab(unique_lab, {"ch": "lto-thin-film"}, Limits(voltage_min_V=0.05, voltage_max_V=3.1))
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db"), twin=True) as local:
        async with Bus(local.url, f"pause-test-{unique_lab}") as bus:
            status = await bus.subscribe(busmod.topic(unique_lab, "ch", "status"))
            flow = asyncio.create_task(run_protocol(str(proto), "ch", local.url, lab=unique_lab))
            pauses = 0
            while (
                not flow.done()
            ):  # each half cycle's onset pauses the run again: resume each time, as an operator would
                try:
                    paused = await wait_doc(
                        status, lambda d: isinstance(d, ChannelStatus) and d.state is ChannelState.paused, 5
                    )
                except TimeoutError:
                    continue
                pauses += 1
                await asyncio.sleep(1.0)  # the cell sits at open circuit while nobody has resumed it
                if paused.step_index is not None:
                    assert not flow.done(), f"pause {pauses}: the run ended while held: {paused}"
                # else: the onset of the charge's plateau came with its last samples and the pause landed as the
                # step ended (the agent says paused with no step; the run then ends). Seen once the compiled
                # electrode made the dry-run fast enough; the agent should refuse a pause between steps (noted).
                await bus.publish(busmod.topic(unique_lab, "ch", "cmd"), ResumeRun(run_id=paused.run_id))
                await wait_doc(
                    status, lambda d: isinstance(d, ChannelStatus) and d.state is not ChannelState.paused, 30
                )
            summary = await flow
        await local.wait_stored(summary.run_id)
        samples = local.store.samples(summary.run_id)
        anomalies = [a for a in local.twin_service.anomalies if a.run_id == summary.run_id]
    assert summary.exit_status == "success" and summary.steps_run == 3
    assert anomalies[0].kind == "oscillation_onset" and anomalies[0].action == "pause"
    # Every pause the agent took was asked for by the twin; an onset found in the last samples of the run can
    # arrive after the run has ended, and a pause for a run that is over is (rightly) ignored.
    assert 1 <= pauses <= len([a for a in anomalies if a.action == "pause"])
    in_steps = samples["step"] >= 1
    held = in_steps & (samples["current_A"] == 0.0)
    assert held.sum() >= 10  # open-circuit samples inside a current step: the pause, recorded
    assert {e.reason.split(":")[0] for e in summary.step_ends} == {"end_condition"}  # every step then ran to its end


def test_a_step_ends_when_the_twins_state_of_charge_reaches_its_target(tmp_path):
    """until: {twin_soc: 0.5}: the flow watches the twin's state and sends EndStep; the agent ends the step.
    The twin anchors its SOC at the end of a full charge and counts charge from there."""
    protocol = tmp_path / "half.yaml"
    protocol.write_text("""
metadata: {name: discharge to half by the twin, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - Discharge at 1C until 1.2 V
  - Charge at 1C until 2.5 V
  - cc: {c_rate: -1, until: {twin_soc: 0.5, voltage_V: 1.2}}
""")
    # 600x: the twin publishes its state every 0.5 s of wall time, 300 s of cell time, 8 % of charge at 1C.
    result = runner.invoke(app, ["dryrun", str(protocol), "--sim", "lto_bare_thinfilm", "--json", "--speed", "600"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    end = report["step_ends"][2]
    assert end["reason"] == "end_condition:twin_soc", end
    assert 0.4 <= end["value"] < 0.5
    full = report["cycles"][0]["charge_Ah"]
    delivered = report["cycles"][-1]["discharge_Ah"]
    assert 0.4 < delivered / full < 0.62  # the cell really is about half empty


@pytest.mark.parametrize(
    ("recording", "kinds"),
    [
        ("lto_bare_film_discharge_0p1C.bdf.csv.gz", ["oscillation_onset"]),
        ("lto_azo60_film_discharge_0p1C.bdf.csv.gz", []),
    ],
)
def test_replay_without_a_model_flags_what_the_data_show(recording, kinds):
    """No --model: the nominal capacity comes from the data (52 uAh, not the 1 Ah a bare twin assumes), so the
    oscillation detector watches the bare film's plateau at its own scale and the coated film's stays quiet."""
    result = runner.invoke(app, ["replay", str(DATA / "replay" / recording), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [a["kind"] for a in report["anomalies"]] == kinds, report["anomalies"]
    replayed = report["replayed"]
    assert replayed["format"] == "bdf" and 5.0e-5 < replayed["nominal_capacity_Ah"] < 5.4e-5
    assert replayed["nominal_capacity_source"].startswith("inferred from the data")
    if kinds:
        onset = report["anomalies"][0]
        assert 1.5 < onset["time_s"] / 3600 < 2.5  # the dry-run it was recorded from flagged it at 1.97 h
        assert 0 < onset["figures"]["correlation"] <= 1.0
