"""The lab file says where agents keep their spools (`spool_dir:`), for an instrument PC whose working directory
is not the disk the journal should live on."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from labtwin.cli.wiring import LocalLab
from labtwin.config.lab import load_lab
from tests.helpers import sim_lab

LABTWIN = str(Path(sys.executable).parent / "labtwin")


def test_labtwin_agent_journals_into_the_lab_files_spool_dir(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        "lab: spoolhere\nspool_dir: journal/spools\nchannels:\n"
        "  ch: {driver: simulated, cell: lto_bare_thinfilm, limits: {voltage_min_V: 0.5, voltage_max_V: 3.0}}\n"
    )
    assert load_lab(lab).spool_dir == Path("journal/spools")
    agent = subprocess.Popen(
        [LABTWIN, "agent", "--channel", "ch", "--lab", str(lab), "--broker", "mqtt://127.0.0.1:9"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "journal" / "spools" / "spoolhere-ch.db.lock").exists():
            assert agent.poll() is None or time.monotonic() < deadline, agent.stderr.read() if agent.stderr else ""
            assert time.monotonic() < deadline, "no spool under the lab file's spool_dir"
            time.sleep(0.1)
        assert not (tmp_path / "labtwin-data" / "spool").exists()
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)


async def test_a_local_lab_gives_its_agents_the_lab_files_spool_dir(embedded_broker, unique_lab, tmp_path):
    config = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"}).model_copy(update={"spool_dir": tmp_path / "sp"})
    async with LocalLab(config, ["ch"], embedded_broker.url, None, record=False) as local:
        await asyncio.sleep(0)
        assert local.agents["ch"].spool is not None
        assert local.agents["ch"].spool.path.parent == tmp_path / "sp"
