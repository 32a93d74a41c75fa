"""A run goes on when its supervised agent is killed mid-step (issue 14; found by a newcomer's trial).

Before: `kill -9` of a supervised agent on a 2450 ended a plain `labtwin run` as failed ("step 1:
error:agent_restart") and stored its RunStop, so nothing could resume it. Now the flow, told by the restarted agent
that the step was cut, takes the run up again: the agent carries the cut step's charge, the cell's open-circuit
voltage is checked in the step's window, and the step runs on with what is left of its time. Real processes:
`labtwin agent --supervise` on the Keithley 2450 emulator (its cell lives on while the agent dies), the flow and
the recorder in the test process, an embedded broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.cli.wiring import LocalLab
from labtwin.orchestration.flows import run_protocol
from labtwin.physics.library import load_cell
from labtwin.simulators.keithley2450 import Keithley2450Emulator
from labtwin.simulators.scpi_server import ScpiEmulatorThread
from tests.helpers import sim_lab
from tests.integration.test_agent_restart import LABTWIN, Stderr, end, first_live_status, lab_file

pytestmark = pytest.mark.usefixtures("prefect_api")

SPEED = 50.0
PROTOCOL = """
metadata: {name: a charge through an agent restart}
record: {interval_s: 2}
safety: {voltage_min_V: 2.0, voltage_max_V: 4.3}
method:
  - rest: {duration_s: 20}
  - cc: {current_A: 1.2e-3, until: {time_s: 600}}  # the emulated LFP cell starts nearly empty
  - rest: {duration_s: 20}
"""


async def test_a_run_goes_on_after_its_supervised_agent_is_killed_mid_step(embedded_broker, unique_lab, tmp_path):
    emulator = Keithley2450Emulator(load_cell("lfp"), speed=SPEED, seed=3)
    proto = tmp_path / "p.yaml"
    proto.write_text(PROTOCOL)
    with ScpiEmulatorThread(emulator) as running:
        lab_path = lab_file(tmp_path, unique_lab, running.port, speed=SPEED)
        recorder_only = sim_lab(unique_lab, {"k1": "lfp"})  # its channels are not started here
        async with LocalLab(recorder_only, [], embedded_broker.url, str(tmp_path / "s.db")) as local:
            supervisor = subprocess.Popen(
                [LABTWIN, "agent", "--supervise", "--channel", "k1", "--lab", str(lab_path)]
                + ["--broker", embedded_broker.url],
                cwd=tmp_path,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            err = Stderr(supervisor)
            try:
                async with Bus(embedded_broker.url) as bus:
                    await first_live_status(await bus.subscribe(busmod.topic(unique_lab, "k1", "status")), 60)
                flow = asyncio.create_task(
                    run_protocol(str(proto), "k1", embedded_broker.url, lab=unique_lab, run_id="through")
                )
                deadline = time.monotonic() + 60
                while not (emulator.output and emulator.source_function == "CURR" and emulator.level["CURR"] > 0):
                    assert not flow.done() and time.monotonic() < deadline, flow
                    await asyncio.sleep(0.02)
                await asyncio.sleep(2.0)  # 100 s of the 600 s charge
                os.kill(err.child_pids()[0], signal.SIGKILL)
                summary = await asyncio.wait_for(flow, 120)
                await local.wait_stored("through")
                store = local.store
                _, stop = store.run_documents("through")
                seqs = store.seqs("through")
                stored = store.sample_count("through")
                outages = store.outages("through")
                ends = {e.step_index: e for e in store.step_events("through")}
            finally:
                rc = await end(supervisor)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(supervisor.pid, signal.SIGKILL)
    assert len(err.child_pids()) >= 2, err.lines
    assert summary.exit_status == "success", summary
    assert stop is not None and stop.exit_status == "success"
    assert seqs == list(range(len(seqs))) and stored == stop.n_samples > 0
    assert len(outages) == 1 and outages[0].step_index == 1
    charge = ends[1]
    assert charge.reason is not None and charge.reason.name == "time_s", charge.reason
    # the whole step's time and charge: before the kill, the outage aside, and after
    assert charge.stats is not None and 550 < charge.stats.duration_s <= 610, charge.stats
    assert charge.stats.charge_Ah > 0.9 * 1.2e-3 * 550 / 3600, charge.stats
    checks = [e for i, e in ends.items() if i >= 1 << 30]
    assert len(checks) == 1 and checks[0].reason is not None and checks[0].reason.kind == "end_condition"
    assert rc == 0, err.lines


RESUMABLE = """
metadata: {name: resumed after its flow was killed}
record: {interval_s: 5}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -2.0, until: {voltage_V: 1.0}}
  - cc: {c_rate: 2.0, until: {voltage_V: 2.5}}
  - rest: {duration_s: 60}
"""


async def test_labtwin_run_resume_goes_on_with_a_run_whose_flow_was_killed(embedded_broker, unique_lab, tmp_path):
    """`kill -9` of `labtwin run` mid-run (the agent, a separate process, holds the run), then `labtwin run
    --resume RUN_ID`: completed steps are not run again, the interrupted one goes on, and the store has the run
    once, whole and successful."""
    from labtwin.data.store import Store
    from tests.helpers import kill_process_group

    proto = tmp_path / "p.yaml"
    proto.write_text(RESUMABLE)
    lab_path = tmp_path / "lab.yaml"
    lab_path.write_text(
        f"lab: {unique_lab}\nchannels:\n  ch: {{driver: simulated, cell: lto_bare_thinfilm, speed: 400, seed: 7, "
        "limits: {voltage_min_V: 0.5, voltage_max_V: 3.0}}\n"
    )
    store_path = tmp_path / "s.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABTWIN_")}
    common = ["--channel", "ch", "--lab", str(lab_path), "--broker", embedded_broker.url, "--store", str(store_path)]
    recorder_only = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})  # its channels are not started here
    async with LocalLab(recorder_only, [], embedded_broker.url, str(store_path)) as local:
        agent = subprocess.Popen(
            [LABTWIN, "agent", "--channel", "ch", "--lab", str(lab_path), "--broker", embedded_broker.url],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            async with Bus(embedded_broker.url) as bus:
                await first_live_status(await bus.subscribe(busmod.topic(unique_lab, "ch", "status")), 60)
            first = subprocess.Popen(
                [LABTWIN, "run", str(proto), *common],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 120
                while not local.store.runs() or len(local.store.step_events(local.store.runs()[0].run_id)) < 2:
                    assert first.poll() is None, first.stderr.read() if first.stderr else ""
                    assert time.monotonic() < deadline, "the run did not get going"
                    await asyncio.sleep(0.2)
                run_id = local.store.runs()[0].run_id
                kill_process_group(first.pid)  # the flow and its Prefect server, as a power cut of its PC
                first.wait(10)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(first.pid, signal.SIGKILL)
            resumed = await asyncio.create_subprocess_exec(
                LABTWIN, "run", str(proto), *common, "--resume", run_id[:12], "--json",
                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )  # fmt: skip
            out, stderr = await asyncio.wait_for(resumed.communicate(), 180)
            await local.wait_stored(run_id)
        finally:
            rc = await end(agent)
        store = Store.open(store_path, read_only=True)
        try:
            _, stop = store.run_documents(run_id)
            seqs = store.seqs(run_id)
            stored = store.sample_count(run_id)
            ends = store.step_events(run_id)
            started = store.step_events(run_id, event="started")
        finally:
            store.close()
    assert resumed.returncode == 0, stderr.decode()[-3000:]
    text = out.decode()
    summary = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert summary["run_id"] == run_id and summary["exit_status"] == "success", summary
    assert stop is not None and stop.exit_status == "success"
    assert seqs == list(range(len(seqs))) and stored == stop.n_samples > 0
    protocol_ends = sorted(e.step_index for e in ends if e.step_index < 1 << 30)
    assert protocol_ends == list(range(4)), ends
    assert all(e.reason is not None and e.reason.kind == "end_condition" for e in ends), ends
    # no completed step was run again: each protocol step started once, the interrupted one at most twice
    counts = [sum(1 for e in started if e.step_index == i) for i in range(4)]
    assert max(counts) <= 2 and counts.count(2) <= 1, counts
    assert rc == 0
