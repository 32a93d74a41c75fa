"""A recorder killed under load loses nothing (issue 14): 8 channels at max speed, `labtwin record` SIGKILLed.

Measured before the spool: 500 to 7 000 samples lost on SQLite, 24-37 % on PostgreSQL (the recorder had
acknowledged to the broker what it had not committed, and held its backlog in memory). The durable copy is now
the agents' spools until a recorder confirms a run whole: the restarted recorder finds the runs it holds
without a RunStop, or sees a RunStop beyond what it holds, and asks the agents for the rest.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from labtwin.cli.wiring import LocalLab
from labtwin.data.store import Store
from labtwin.documents import EndConditions, Limits, StepCommand, StepKind
from tests.helpers import run_steps_by_hand, sim_lab
from tests.mosquitto_proc import MosquittoProcess

LABTWIN = str(Path(sys.executable).parent / "labtwin")
CHANNELS = [f"r{i}" for i in range(8)]
CELL_S = 4 * 3600


def _recorder(url: str, store: str, lab: Path, cwd: Path, n: int) -> subprocess.Popen[bytes]:
    log = open(cwd / f"recorder.{n}.log", "wb")  # noqa: SIM115 - the child holds it
    try:
        return subprocess.Popen(
            [LABTWIN, "record", "--broker", url, "--lab", str(lab), "--store", store],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_recorder_killed_under_load_loses_nothing(backend, unique_lab, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    store = str(tmp_path / "s.db") if backend == "sqlite" else request.getfixturevalue("postgres_url")
    lab = sim_lab(unique_lab, {ch: "lco_lgps_glassy" for ch in CHANNELS}, Limits(voltage_min_V=1.5, voltage_max_V=4.0))
    lab_file = tmp_path / "lab.yaml"
    lab_file.write_text(yaml.safe_dump(lab.model_dump(mode="json", exclude_none=True)))
    step = StepCommand(
        run_id="", step_index=0, step=StepKind.rest, end=EndConditions(time_s=CELL_S), sample_interval_s=1
    )
    with MosquittoProcess(tmp_path / "broker") as broker:
        recorder = _recorder(broker.url, store, lab_file, tmp_path, 0)
        try:
            async with LocalLab(lab, CHANNELS, broker.url, None, record=False) as local:
                await asyncio.sleep(3.0)  # the recorder subscribed
                runs = asyncio.gather(
                    *(
                        run_steps_by_hand(
                            local.url,
                            unique_lab,
                            ch,
                            f"{unique_lab}-{ch}",
                            [step.model_copy(update={"run_id": f"{unique_lab}-{ch}"})],
                        )
                        for ch in CHANNELS
                    )
                )
                await asyncio.sleep(1.5)  # mid-run, the store behind
                os.killpg(recorder.pid, signal.SIGKILL)
                recorder.wait(10)
                await asyncio.sleep(4.0)
                recorder = _recorder(broker.url, store, lab_file, tmp_path, 1)
                results = await asyncio.wait_for(runs, 120)
                produced = {stop.run_id: stop.n_samples for _, stop in results}
                stored: dict[str, int] = {}
                for _ in range(120):  # gap filling: the restarted recorder asks the agents' spools
                    reader = Store.open(store, read_only=True)
                    try:
                        stored = {r: reader.sample_count(r) for r in produced}
                    finally:
                        reader.close()
                    if stored == produced:
                        break
                    await asyncio.sleep(0.5)
        finally:
            os.killpg(recorder.pid, signal.SIGKILL)
            recorder.wait(10)
    assert sum(produced.values()) == len(CHANNELS) * CELL_S
    assert stored == produced, {r: produced[r] - stored.get(r, 0) for r in produced}
