"""One precedence rule for every command: flag > LABTWIN_* > the lab file's line > built-in default.

Each rung is shown through the real CLI for the commands that used to get it wrong (`runs` and `export`
ignored the lab file's `store:`, `monitor` its `broker:`): a rung wins only when the one above it is
absent, so every test gives the rung below it a value that would make the command visibly do otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labtwin.cli import app
from labtwin.config.settings import Settings
from labtwin.data.store import Store
from labtwin.documents import ChannelState, ChannelStatus, RunStart, SampleBatch

runner = CliRunner()
LAB_CHANNELS = "channels:\n  ch1: {driver: simulated, cell: lto_bare_thinfilm}\n"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No LABTWIN_* of the machine running the tests, and a working directory of the test's own."""
    for name in list(os.environ):
        if name.startswith("LABTWIN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def lab_file(path: Path, broker: str | None = None, store: str | None = None) -> Path:
    lines = ["lab: settings-test"]
    if broker:
        lines.append(f"broker: {broker}")
    if store:
        lines.append(f"store: {store}")
    path.write_text("\n".join(lines) + "\n" + LAB_CHANNELS)
    return path


def store_with_run(path: Path, run_id: str) -> str:
    """A store holding one run of two samples: which store a command read shows in the run it finds."""
    store = Store.open(str(path))
    store.write(
        [
            RunStart(run_id=run_id, lab="settings-test", channel="ch1", cell_id="c1", protocol="p", n_steps=1),
            SampleBatch(
                run_id=run_id,
                channel="ch1",
                seq=0,
                time_s=[0.0, 1.0],
                voltage_V=[1.5, 1.6],
                current_A=[1e-4, 1e-4],
                capacity_Ah=[0.0, 2.8e-8],
                temperature_C=[None, None],
                step=[0, 0],
                cycle=[0, 0],
            ),
        ]
    )
    store.close()
    return str(path)


@pytest.fixture
def four_stores(tmp_path):
    """One store per rung, each with a run whose id says which rung it belongs to (all share prefix 'run-')."""
    (tmp_path / "labtwin-data").mkdir()
    return {
        rung: store_with_run(path, f"run-{rung}")
        for rung, path in {
            "flag": tmp_path / "flag.db",
            "env": tmp_path / "env.db",
            "lab": tmp_path / "lab.db",
            "default": tmp_path / "labtwin-data" / "labtwin.db",
        }.items()
    }


def listed_runs(*args: str) -> list[str]:
    result = runner.invoke(app, ["runs", "--json", *args])
    assert result.exit_code == 0, result.output
    return [r["run_id"] for r in json.loads(result.stdout)]


# --------------------------------------------------------------------------- the model itself


def test_the_ladder_for_broker_and_store_in_the_settings_model(tmp_path, monkeypatch):
    lab = lab_file(tmp_path / "lab.yaml", broker="mqtt://lab:1883", store="lab.db")
    assert Settings.resolve().broker is None and Settings.resolve().store == str(Path("labtwin-data/labtwin.db"))
    at_lab = Settings.resolve(lab=lab)
    assert (at_lab.broker, at_lab.store) == ("mqtt://lab:1883", "lab.db")
    monkeypatch.setenv("LABTWIN_BROKER", "mqtt://env:1883")
    monkeypatch.setenv("LABTWIN_STORE", "env.db")
    at_env = Settings.resolve(lab=lab)
    assert (at_env.broker, at_env.store) == ("mqtt://env:1883", "env.db")
    at_flag = Settings.resolve(lab=lab, broker="mqtt://flag:1883", store="flag.db")
    assert (at_flag.broker, at_flag.store) == ("mqtt://flag:1883", "flag.db")
    assert Settings.resolve(lab=lab, broker=None).broker == "mqtt://env:1883"  # a flag not given falls through


def test_the_lab_file_itself_flag_then_env_then_the_file_a_command_runs_then_the_packaged_one(tmp_path, monkeypatch):
    from labtwin.config.lab import DEFAULT_LAB_FILE

    campaign_lab = lab_file(tmp_path / "campaign-lab.yaml", store="campaign.db")
    env_lab = lab_file(tmp_path / "env-lab.yaml", store="env-lab.db")
    flag_lab = lab_file(tmp_path / "flag-lab.yaml", store="flag-lab.db")
    assert Settings.resolve().lab_file == DEFAULT_LAB_FILE
    assert Settings.resolve(fallback_lab=campaign_lab).store == "campaign.db"
    monkeypatch.setenv("LABTWIN_LAB", str(env_lab))
    assert Settings.resolve(fallback_lab=campaign_lab).store == "env-lab.db"
    assert Settings.resolve(lab=flag_lab, fallback_lab=campaign_lab).store == "flag-lab.db"


def test_speed_flag_then_env_then_each_channels_own(monkeypatch):
    assert Settings.resolve().speed_value == "config"  # each channel's `speed:` in the lab file
    monkeypatch.setenv("LABTWIN_SPEED", "250")
    assert Settings.resolve().speed_value == 250.0
    assert Settings.resolve(speed="max").speed_value is None
    monkeypatch.setenv("LABTWIN_SPEED", "fast")
    result = runner.invoke(app, ["agent", "--channel", "ch1", "--broker", "mqtt://127.0.0.1:1"])
    assert result.exit_code == 2 and "LABTWIN_SPEED" in result.stderr and "'fast'" in result.stderr


def test_a_broken_lab_file_named_by_the_environment_is_one_line_naming_it(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("lab: [unclosed\n")
    monkeypatch.setenv("LABTWIN_LAB", str(broken))
    refused = runner.invoke(app, ["runs"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert refused.stderr.strip() == f"error: {broken}:2: not valid YAML: expected ',' or ']', but got '<stream end>'"


# --------------------------------------------------------------------------- runs and export, the store


def test_runs_reads_the_store_of_each_rung(tmp_path, monkeypatch, four_stores):
    lab = lab_file(tmp_path / "lab.yaml", store=four_stores["lab"])
    assert listed_runs() == ["run-default"]
    assert listed_runs("--lab", str(lab)) == ["run-lab"]
    monkeypatch.setenv("LABTWIN_LAB", str(lab))
    assert listed_runs() == ["run-lab"]  # the lab file named by the environment counts the same
    monkeypatch.setenv("LABTWIN_STORE", four_stores["env"])
    assert listed_runs() == ["run-env"]
    assert listed_runs("--store", four_stores["flag"]) == ["run-flag"]


def test_export_reads_the_store_of_each_rung(tmp_path, monkeypatch, four_stores):
    lab = lab_file(tmp_path / "lab.yaml", store=four_stores["lab"])

    def exported(*args: str) -> str:
        out = tmp_path / f"{uuid.uuid4().hex[:6]}.csv"
        result = runner.invoke(app, ["export", "run-", "--out", str(out), "--json", *args])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["samples"] == 2 and out.exists()
        return report["run_id"]

    assert exported() == "run-default"
    assert exported("--lab", str(lab)) == "run-lab"
    monkeypatch.setenv("LABTWIN_LAB", str(lab))
    assert exported() == "run-lab"
    monkeypatch.setenv("LABTWIN_STORE", four_stores["env"])
    assert exported() == "run-env"
    assert exported("--store", four_stores["flag"]) == "run-flag"


def test_analyze_cycling_of_a_run_reads_the_lab_files_store(tmp_path, monkeypatch, four_stores):
    lab = lab_file(tmp_path / "lab.yaml", store=four_stores["lab"])
    monkeypatch.setenv("LABTWIN_LAB", str(lab))
    found = runner.invoke(app, ["analyze", "cycling", "run-lab", "--json"])
    assert found.exit_code == 0, found.output
    missing = runner.invoke(app, ["analyze", "cycling", "run-default", "--json"])
    assert missing.exit_code == 2 and "run-default" in missing.stderr and four_stores["lab"] in missing.stderr


# --------------------------------------------------------------------------- monitor, the broker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_broker():
    """`labtwin broker` in its own process, with a retained status of a channel only this broker knows."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from labtwin.cli import main; main()", "broker", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the broker did not start"
                time.sleep(0.1)
        url = f"mqtt://127.0.0.1:{port}"
        lab, channel = f"settings{uuid.uuid4().hex[:6]}", f"c{uuid.uuid4().hex[:3]}"  # short: the table is narrow

        async def publish() -> None:
            from labtwin import bus as busmod
            from labtwin.bus import Bus

            async with Bus(url, f"settings-test-{channel}") as bus:
                status = ChannelStatus(channel=channel, state=ChannelState.idle)
                await bus.publish(busmod.topic(lab, channel, "status"), status, retain=True)
                await bus.flush()

        asyncio.run(publish())
        yield url, lab, channel
    finally:
        proc.terminate()
        proc.wait(15)


def monitored(lab_name: str, *args: str) -> str:
    result = runner.invoke(app, ["monitor", "--lab-name", lab_name, "--seconds", "1.5", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_monitor_reaches_the_broker_of_each_rung(tmp_path, monkeypatch, live_broker):
    """The rung below the winner names a port where nothing listens: reaching the live broker proves the winner."""
    url, lab_name, channel = live_broker
    nowhere = f"mqtt://127.0.0.1:{_free_port()}"
    refused = runner.invoke(app, ["monitor", "--lab-name", lab_name, "--seconds", "1"])
    assert refused.exit_code == 2 and "monitor needs the lab's broker" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    at_lab = lab_file(tmp_path / "lab.yaml", broker=url)
    assert channel in monitored(lab_name, "--lab", str(at_lab))
    monkeypatch.setenv("LABTWIN_LAB", str(lab_file(tmp_path / "dead-lab.yaml", broker=nowhere)))
    monkeypatch.setenv("LABTWIN_BROKER", url)
    assert channel in monitored(lab_name)
    monkeypatch.setenv("LABTWIN_BROKER", nowhere)
    assert channel in monitored(lab_name, "--broker", url)
