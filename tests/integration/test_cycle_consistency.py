"""One run, one set of cycle figures: the summary, `analyze cycling` on the run in the store and on each
export (csv, parquet, BDF), the dry-run's samples.csv and the twin report the same cycle numbers,
capacities and Coulombic efficiency; an anode half cell's low CE stops the run; a run resumed after its
flow was SIGKILLed and its agent died mid-step reports what an uninterrupted run does."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from labtwin.agent import Agent
from labtwin.cli import app
from labtwin.cli.dryrun import write_outputs
from labtwin.cli.wiring import LocalLab, build_channel
from labtwin.data.replay import read_recording
from labtwin.orchestration.flows import run_protocol
from tests.helpers import kill_process_group, sim_lab

pytestmark = pytest.mark.usefixtures("prefect_api")
runner = CliRunner()
LABTWIN = str(Path(sys.executable).parent / "labtwin")

# A cathode (charged first), recorded sparsely (the agent reads every 6 s, records every 60 s or 20 mV), with
# CCCV, a CV hold at a new voltage, rests and a spectrum: everything that has moved a cycle figure before.
CATHODE = """
metadata: {name: cycle figures, chemistry: LCO|LGPS|Li-In, nominal_capacity_Ah: 1.2e-3}
record: {interval_s: 60, voltage_change_V: 0.02}
safety: {voltage_min_V: 1.9, voltage_max_V: 3.75}
method:
  - rest: {duration_s: 120}
  - repeat: 2
    steps:
      - cccv: {c_rate: 1, voltage_V: 3.6, until: {c_rate: 0.2}}
      - rest: {duration_s: 120}
      - cc: {c_rate: -1, until: {voltage_V: 2.6}}
  - eis: {f_start_Hz: 1000, f_end_Hz: 1, points_per_decade: 4}
  - cc: {c_rate: 1, until: {voltage_V: 3.4}}
  - cv: {voltage_V: 3.5, until: {c_rate: 0.2, time_s: 1800}}
  - cc: {c_rate: -1, until: {voltage_V: 2.6}}
"""

# An anode half cell (lithiated first) whose delithiation is cut short: CE = charge / discharge, about 0.67.
ANODE = """
metadata: {name: anode CE stop, chemistry: LTO|Li, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 30}
safety: {voltage_min_V: 0.1, voltage_max_V: 3.0}
stop_when: {coulombic_efficiency_below: 0.9}
method:
  - repeat: 3
    steps:
      - cc: {c_rate: -2, until: {voltage_V: 1.2}}
      - cc: {c_rate: 2, until: {voltage_V: 2.5, time_s: 1200}}
"""


def figures(cycles) -> list[tuple]:
    """Cycle number, charge, discharge and CE of each cycle, from a summary's or analyze's JSON or CycleSummary."""
    rows = [c if isinstance(c, dict) else c.model_dump() for c in cycles]
    return [(r["cycle"], r["charge_Ah"], r["discharge_Ah"], r["coulombic_efficiency"]) for r in rows]


def assert_same(got: list[tuple], want: list[tuple], rel: float = 1e-9, what: str = "") -> None:
    """The same cycles with the same charge, discharge and CE (None where the cycle did not go both ways)."""
    assert [g[0] for g in got] == [w[0] for w in want], (what, got, want)
    for g, w in zip(got, want):
        assert g[1:3] == pytest.approx(w[1:3], rel=rel, abs=1e-15), (what, g, w)
        assert (g[3] is None) == (w[3] is None) and (w[3] is None or g[3] == pytest.approx(w[3], rel=rel)), (what, g, w)


def analyze(source: Path | str, store: Path | None = None) -> list[tuple]:
    args = ["analyze", "cycling", str(source), "--json"] + (["--store", str(store)] if store else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return figures(json.loads(result.stdout)["cycles"])


async def test_one_run_gives_the_same_cycle_figures_through_every_output(embedded_broker, unique_lab, tmp_path):
    protocol = tmp_path / "cathode.yaml"
    protocol.write_text(CATHODE)
    store = tmp_path / "run.db"
    lab = sim_lab(unique_lab, {"c1": "lco_lgps_glassy"})
    async with LocalLab(lab, ["c1"], embedded_broker.url, str(store), twin=True) as local:
        summary = await run_protocol(str(protocol), "c1", local.url, lab=lab.lab)
        await local.wait_stored(summary.run_id)
        await local.twin_service.wait_run_followed(summary.run_id, timeout_s=120)
        twin = local.twin_service.twins["c1-cell"]
        write_outputs(local.store, summary, tmp_path / "dry", "cycle figures")
    assert summary.exit_status == "success", summary.reason
    want = figures(summary.cycles)
    # Three cycles, each opened by a charge: the repeat's two, then the CC + CV charge after the spectrum.
    assert [w[0] for w in want] == [1, 2, 3]
    assert all(c.first_direction == "charge" for c in summary.cycles)
    for _, charge, discharge, ce in want:  # a cathode: discharge / charge
        assert ce == pytest.approx(discharge / charge) and 0.9 < ce < 1.01, want
    cycle_of_step = {e.step_index: e.cycle for e in summary.step_ends}
    assert [cycle_of_step[k] for k in sorted(cycle_of_step)] == [0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]

    assert_same(analyze(summary.run_id, store), want)
    samples_csv = tmp_path / "dry" / "samples.csv"
    assert_same(analyze(samples_csv), want)
    dry = read_recording(samples_csv)
    assert np.array_equal(dry.cycle, [cycle_of_step[int(s)] for s in dry.step])  # every sample carries its cycle
    for fmt, name in (("csv", "run.csv"), ("parquet", "run.parquet"), ("bdf", "run.bdf")):
        out = tmp_path / "export" / name
        result = runner.invoke(
            app, ["export", summary.run_id, "--format", fmt, "--out", str(out), "--store", str(store)]
        )
        assert result.exit_code == 0, result.output
        assert_same(analyze(out), want, what=fmt)
        assert np.array_equal(read_recording(out).cycle, dry.cycle), fmt  # BDF's Cycle Count is the cycle

    # The twin closed the same cycles with the same figures, and stands in the run's last cycle.
    assert_same(figures(twin.cycling.cycles), want)
    assert twin.state.cycle == 3
    assert twin.state.coulombic_efficiency == pytest.approx(want[-1][3], rel=1e-9)
    assert twin.state.capacity_Ah == pytest.approx(want[-1][2], rel=1e-9)  # delivered: a cathode's discharge


async def test_a_low_ce_on_an_anode_half_cell_stops_the_run(embedded_broker, unique_lab, tmp_path):
    """LTO|Li starts by lithiating (discharging): its CE is charge / discharge, and stop_when reads that."""
    protocol = tmp_path / "anode.yaml"
    protocol.write_text(ANODE)
    store = tmp_path / "run.db"
    lab = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["c1"], embedded_broker.url, str(store)) as local:
        summary = await run_protocol(str(protocol), "c1", local.url, lab=lab.lab)
        await local.wait_stored(summary.run_id)
    assert summary.exit_status == "success"
    assert summary.reason.startswith("stop_when met after cycle 1") and "CE 6" in summary.reason, summary.reason
    assert summary.steps_run == 2  # the second cycle's discharge never ran
    (cycle,) = summary.cycles
    assert cycle.first_direction == "discharge" and cycle.delivered_Ah == cycle.charge_Ah
    assert cycle.coulombic_efficiency == pytest.approx(cycle.charge_Ah / cycle.discharge_Ah)
    assert 0.6 < cycle.coulombic_efficiency < 0.75
    assert_same(analyze(summary.run_id, store), figures(summary.cycles))


RESUMABLE = """
metadata: {name: resumable cycling, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 300}
  - repeat: 3
    steps:
      - Discharge at 2C until 1.2 V
      - Rest for 5 minutes
      - Charge at 2C until 2.5 V
      - Rest for 5 minutes
"""


def _campaign(tmp_path: Path, lab: str) -> Path:
    (tmp_path / "cycle.yaml").write_text(RESUMABLE)
    channel = {
        "driver": "simulated",
        "cell": "lto_bare_thinfilm",
        "limits": {"voltage_min_V": 0.1, "voltage_max_V": 4.0},
    }
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump({"lab": lab, "channels": {"c1": channel}}))
    path = tmp_path / "campaign.yaml"
    cell = {
        "id": "LTO-1",
        "channels": ["c1"],
        "protocols": [str(tmp_path / "cycle.yaml")],
        "nominal_capacity_Ah": 5.18e-5,
    }
    path.write_text(yaml.safe_dump({"campaign": "c", "cells": [cell]}))
    return path


async def test_a_run_resumed_after_a_kill_mid_step_reports_the_figures_of_an_uninterrupted_run(
    embedded_broker, unique_lab, tmp_path
):
    """The campaign's process is SIGKILLed and the agent dies mid-charge (the instrument, with its cell, lives on:
    here the simulated channel's driver and clock). A new agent and the campaign run again: the cycle counter goes
    on where it was and the cut charge step's statistics count the charge passed before the crash, so the run
    reports the cycles an uninterrupted run of the same protocol does, but for the samples the dead agent never
    sent (the cell took that charge, no record has it: here a sample or two, as the agent publishes every one)."""
    campaign = _campaign(tmp_path, unique_lab)
    store_path = tmp_path / "s.db"
    run_id = "c-LTO-1-1-cycle"
    command = [LABTWIN, "campaign", "run", str(campaign), "--broker", embedded_broker.url]
    command += ["--lab", str(tmp_path / "lab.yaml"), "--store", str(store_path)]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    lab = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"}, speed=500.0)
    config = lab.channel("c1")
    built = build_channel("c1", config, 500.0, lab.lab)

    def new_agent() -> Agent:
        return Agent(
            lab=lab.lab,
            channel="c1",
            driver=built.driver,
            clock=built.clock,
            broker_url=embedded_broker.url,
            channel_limits=config.limits,
            cell_id="c1-cell",
            nominal_capacity_Ah=5.18e-5,
            batch_size=1,  # what a crash loses is the unsent tail of the record: here a sample or two
        )

    async with LocalLab(lab, [], embedded_broker.url, str(store_path)) as local:
        agent = new_agent()
        serving = asyncio.create_task(agent.serve())
        await agent.wait_ready()
        first = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 120
            # rest, then cycle 1 (discharge, rest, charge, rest), then cycle 2's discharge and rest: its charge runs
            while len(local.store.step_events(run_id)) < 7:
                assert first.poll() is None, first.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the campaign did not get going"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # into the charge (about 3.6 s of wall time at 500x)
        finally:
            kill_process_group(first.pid)
            first.wait(10)
        serving.cancel()  # the agent's PC dies: no RunStop, no end of the step
        await asyncio.gather(serving, return_exceptions=True)
        interrupted = max(e.step_index for e in local.store.step_events(run_id, event="started"))
        assert interrupted == 7
        agent = new_agent()
        serving = asyncio.create_task(agent.serve())
        await agent.wait_ready()
        try:
            second = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
            try:
                out, err = await asyncio.wait_for(second.communicate(), 240)
            except BaseException:
                kill_process_group(second.pid)
                raise
            assert second.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
            await local.wait_stored(run_id)
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        _, stop = local.store.run_documents(run_id)
        assert stop is not None and stop.exit_status == "success", stop

    resumed = analyze(run_id, store_path)
    exported = tmp_path / "resumed.csv"
    result = runner.invoke(
        app, ["export", run_id, "--format", "csv", "--out", str(exported), "--store", str(store_path)]
    )
    assert result.exit_code == 0, result.output
    assert_same(analyze(exported), resumed, rel=1e-6, what="store vs its csv export after the resume")
    # The same protocol, uninterrupted, on a fresh cell of the same kind.
    reference_lab = sim_lab(f"{unique_lab}-ref", {"c1": "lto_bare_thinfilm"})
    async with LocalLab(reference_lab, ["c1"], embedded_broker.url, str(tmp_path / "ref.db")) as ref:
        reference = await run_protocol(str(tmp_path / "cycle.yaml"), "c1", ref.url, lab=reference_lab.lab)
    want = figures(reference.cycles)
    assert [r[0] for r in resumed] == [w[0] for w in want] == [1, 2, 3]
    for got, ref_cycle in zip(resumed, want):
        assert got[1:] == pytest.approx(ref_cycle[1:], rel=0.015), (got, ref_cycle)
