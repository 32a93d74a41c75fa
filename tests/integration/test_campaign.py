"""Campaigns as a lab runs them: `labtwin campaign run` in its own process against agents that live elsewhere,
killed mid-protocol and run again: it resumes at the interrupted step, never repeating a completed one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from labtwin.cli.wiring import LocalLab
from labtwin.data.store import Store
from labtwin.orchestration.campaign import load_campaign, plan
from labtwin.protocols.model import ProtocolError
from tests.helpers import kill_process_group, sim_lab

LABTWIN = str(Path(sys.executable).parent / "labtwin")
PROTOCOL = """
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


def write_campaign(tmp_path, lab: str, cells: dict[str, list[str]]) -> Path:
    (tmp_path / "cycle.yaml").write_text(PROTOCOL)
    (tmp_path / "lab.yaml").write_text(
        yaml.safe_dump(
            {
                "lab": lab,
                "channels": {
                    ch: {
                        "driver": "simulated",
                        "cell": "lto_bare_thinfilm",
                        "limits": {"voltage_min_V": 0.1, "voltage_max_V": 4.0},
                    }
                    for chans in cells.values()
                    for ch in chans
                },
            }
        )
    )
    path = tmp_path / "campaign.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "campaign": "c",
                "cells": [
                    {
                        "id": cell,
                        "channels": chans,
                        "protocols": [str(tmp_path / "cycle.yaml")],
                        "nominal_capacity_Ah": 5.18e-5,
                    }
                    for cell, chans in cells.items()
                ],
            }
        )
    )
    return path


def test_a_campaign_file_is_checked_and_planned(tmp_path):
    path = write_campaign(tmp_path, "plan", {"A": ["c1", "c2"], "B": ["c1", "c2"], "C": ["c1"]})
    jobs = plan(load_campaign(path))
    assert [(j.cell.id, j.channel) for j in jobs] == [("A", "c1"), ("B", "c2"), ("C", "c1")]  # a pool spreads its cells
    assert jobs[0].run_id == "c-A-1-cycle"
    bad = tmp_path / "bad.yaml"
    bad.write_text("campaign: c\ncells:\n  - id: A\n    channels: []\n    protocols: [no-such-protocol]\n")
    with pytest.raises(ProtocolError) as caught:
        load_campaign(bad)
    message = str(caught.value)
    assert f"{bad}:4: cells[0].channels: List should have at least 1 item" in message
    assert f"{bad}:5: cells[0].protocols: no protocol file 'no-such-protocol'" in message


async def test_killing_a_running_campaign_and_rerunning_it_resumes_without_repeating_a_step(
    embedded_broker, unique_lab, tmp_path
):
    campaign = write_campaign(tmp_path, unique_lab, {"LTO-1": ["c1"]})
    store_path = tmp_path / "s.db"
    lab = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"}, speed=500.0)
    command = [
        LABTWIN,
        "campaign",
        "run",
        str(campaign),
        "--broker",
        embedded_broker.url,
        "--lab",
        str(tmp_path / "lab.yaml"),
        "--store",
        str(store_path),
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}  # its own Prefect server and database
    async with LocalLab(lab, ["c1"], embedded_broker.url, str(store_path)) as local:
        sent: list[int] = []
        agent = local.agents["c1"]
        run_step = agent._run_step

        async def counting(cmd):
            sent.append(cmd.step_index)
            await run_step(cmd)

        agent._run_step = counting
        # Its own process group: the SIGKILL takes the campaign's Prefect server with it, as a power cut would.
        first = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        run_id = "c-LTO-1-1-cycle"
        try:
            deadline = time.monotonic() + 120
            while len(local.store.step_events(run_id)) < 3:  # rest and the first discharge done, mid-protocol
                assert first.poll() is None, first.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the campaign did not get going"
                await asyncio.sleep(0.2)
        finally:
            kill_process_group(first.pid)  # the flow's process dies; the agent and the recorder live on
            first.wait(10)
        completed_before = {e.step_index for e in local.store.step_events(run_id)}
        second = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True
        )
        try:
            out, err = await asyncio.wait_for(second.communicate(), 240)
        except TimeoutError:
            kill_process_group(second.pid)
            out, err = await second.communicate()
            raise AssertionError(err.decode()[-6000:]) from None
        except BaseException:
            kill_process_group(second.pid)
            raise
        assert second.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
        await local.wait_stored(run_id)
        start, stop = local.store.run_documents(run_id)
        ended = local.store.step_events(run_id)
        seqs = local.store.seqs(run_id)
        stored = local.store.sample_count(run_id)
    assert stop is not None and stop.exit_status == "success", stop
    compiled = list(range(13))  # rest + 3 x 4 steps
    assert sorted(i for i in sent if i < 100_000) == compiled  # every step sent once: none repeated, none skipped
    assert [i for i in sent if i >= 100_000] and min(i for i in sent if i >= 100_000) - 100_000 not in completed_before
    assert sorted(e.step_index for e in ended if e.step_index < 100_000) == compiled
    assert all(e.reason.kind == "end_condition" for e in ended)
    assert seqs == list(range(len(seqs)))  # the record goes on without a gap or a duplicate
    assert stored == stop.n_samples
    status = subprocess.run(
        [LABTWIN, "campaign", "status", str(campaign), "--lab", str(tmp_path / "lab.yaml"), "--store", str(store_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert status.returncode == 0 and status.stdout.strip().endswith("1 finished")
    Store.open(store_path).close()


async def test_killing_the_agent_mid_step_and_rerunning_the_campaign_resumes_at_that_step(
    embedded_broker, unique_lab, tmp_path
):
    """The agent's process dies mid-step (SIGKILL: no goodbye), and the campaign's with it; the agent comes
    back; rerunning the campaign resumes at the step that was cut off, with a fresh agent that never saw it."""
    campaign = write_campaign(tmp_path, unique_lab, {"LTO-1": ["c1"]})
    store_path = tmp_path / "s.db"
    lab_file = str(tmp_path / "lab.yaml")
    agent_cmd = [
        LABTWIN,
        "agent",
        "--channel",
        "c1",
        "--lab",
        lab_file,
        "--broker",
        embedded_broker.url,
        "--speed",
        "400",
    ]
    campaign_cmd = [
        LABTWIN,
        "campaign",
        "run",
        str(campaign),
        "--broker",
        embedded_broker.url,
        "--lab",
        lab_file,
        "--store",
        str(store_path),
    ]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    run_id = "c-LTO-1-1-cycle"
    recorder_only = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"})  # its channels are not started here
    async with LocalLab(recorder_only, [], embedded_broker.url, str(store_path)) as local:
        # Each in its own process group, so a SIGKILL takes what the process started (the campaign's Prefect
        # server) down with it, as a power cut would.
        agent = subprocess.Popen(  # in tmp_path: its spool and session are the test's, not the checkout's
            agent_cmd,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        first = subprocess.Popen(
            campaign_cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 120
            while len(local.store.step_events(run_id)) < 3:  # rest, discharge, rest done: the charge is running
                assert first.poll() is None, first.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the campaign did not get going"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # into the charge (about 4 s of wall time at 400x)
            killed_at = datetime.now(UTC)
            kill_process_group(agent.pid)
            agent.wait(10)
            interrupted = max(e.step_index for e in local.store.step_events(run_id, event="started"))
            # The campaign's process would fail the job for want of a channel (the agent's will, or the step's
            # timeout); here it dies too, as a power cut takes both.
            kill_process_group(first.pid)
            first.wait(10)
            agent = subprocess.Popen(
                agent_cmd,
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            second = await asyncio.create_subprocess_exec(
                *campaign_cmd,
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
            kill_process_group(first.pid)  # gone already unless the test failed before the kill
            first.wait(10)
            kill_process_group(agent.pid)
            agent.wait(10)
        _, stop = local.store.run_documents(run_id)
        ended = [e for e in local.store.step_events(run_id) if e.step_index < 100_000]
        started = [e.step_index for e in local.store.step_events(run_id, event="started") if e.step_index < 100_000]
        seqs = local.store.seqs(run_id)
    assert stop is not None and stop.exit_status == "success", stop
    assert sorted(e.step_index for e in ended) == list(range(13)) and all(
        e.reason.kind == "end_condition" for e in ended
    )
    assert interrupted == 3 and sorted(set(started)) == list(range(13))
    # The steps completed before the kill were not run again (their ends are the ones from before it); the cut-off
    # step and everything after it ended after the restart.
    assert all((e.wall_time < killed_at) == (e.step_index < interrupted) for e in ended)
    assert (
        seqs == sorted(set(seqs)) and seqs[0] == 0
    )  # no duplicate batch; the dead agent's unsent tail is the only gap


async def test_a_campaign_run_on_prefect_in_memory_keeps_nothing_of_prefect_and_everything_in_the_store(
    embedded_broker, unique_lab, tmp_path
):
    """`--prefect-db memory`: the ephemeral API's database in memory (the fast choice for big campaigns); no
    Prefect database file is written, the store has the run. A database it cannot use is refused by name."""
    campaign = write_campaign(tmp_path, unique_lab, {"LTO-1": ["c1"]})
    (tmp_path / "cycle.yaml").write_text(PROTOCOL.replace("  - repeat: 3", "  - repeat: 1"))
    store_path = tmp_path / "s.db"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    command = [
        LABTWIN,
        "campaign",
        "run",
        str(campaign),
        "--broker",
        embedded_broker.url,
        "--lab",
        str(tmp_path / "lab.yaml"),
        "--store",
        str(store_path),
    ]
    bad = subprocess.run([*command, "--prefect-db", "mysql://db"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--prefect-db 'mysql://db': give memory, a postgresql://" in bad.stderr, bad.stderr
    lab = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"}, speed=2000.0)
    async with LocalLab(lab, ["c1"], embedded_broker.url, str(store_path)) as local:
        done = await asyncio.create_subprocess_exec(
            *command, "--prefect-db", "memory", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(done.communicate(), 180)
        assert done.returncode == 0, (out.decode()[-2000:], err.decode()[-3000:])
        await local.wait_stored("c-LTO-1-1-cycle")
        _, stop = local.store.run_documents("c-LTO-1-1-cycle")
    assert stop is not None and stop.exit_status == "success"
    assert not list((tmp_path / "prefect").glob("*.db"))  # Prefect wrote no database file
