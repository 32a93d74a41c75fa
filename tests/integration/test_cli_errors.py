"""Every user error is one line on stderr naming the file or field, with a non-zero exit and no traceback.

Through the real CLI: typer's CliRunner for most cases, real subprocesses where the point is what a
separate process does (Prefect never imported for a bad file; SIGINT during `labtwin run`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from typer.testing import CliRunner

from labtwin.cli import app
from labtwin.documents import ChannelState, ChannelStatus

runner = CliRunner()
LABTWIN = [sys.executable, "-c", "from labtwin.cli import main; main()"]
BAD_PROTOCOL = (
    "metadata: {name: x}\nsafety: {voltage_min_V: 1, voltage_max_V: 3}\n"
    "method:\n  - cc: {c_rate: fast, until: {voltage_V: 2}}\n"
)
# Passes every static check, then trips its own safety limit: 1C lithiation of LTO for 2 h goes below 1.4 V.
TRIPPING_PROTOCOL = (
    "metadata: {name: trips its safety limit, chemistry: LTO|Li}\n"
    "safety: {voltage_min_V: 1.4, voltage_max_V: 3.0}\n"
    "method:\n  - rest: {duration_s: 60}\n  - cc: {c_rate: -1.0, until: {time_s: 7200}}\n"
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("LABTWIN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def one_error_line(stderr: str, *names: str) -> str:
    """The stderr of a refused command: exactly one line, `error: ...`, naming every one of ``names``."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for name in names:
        assert name in lines[0], (name, stderr)
    return lines[0]


def refused(args: list[str], *names: str, code: int = 2) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == code, (result.exit_code, result.output)
    return one_error_line(result.stderr, *names)


# --------------------------------------------------------------------------- files


def test_a_malformed_protocol_is_refused_in_one_line_before_prefect_is_imported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_PROTOCOL)
    script = (
        "import sys\nfrom labtwin.cli import main\nsys.argv = ['labtwin', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    print('prefect imported' if 'prefect' in sys.modules else 'prefect not imported')\n"
        "    raise\n"
    )
    for command in (["dryrun", str(bad), "--sim", "lto_bare_thinfilm"], ["run", str(bad), "--channel", "ch1"]):
        proc = subprocess.run(
            [sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr
        one_error_line(proc.stderr, "bad.yaml", "method[0].cc.c_rate", "fast")
        assert proc.stdout.strip() == "prefect not imported"


def test_a_binary_file_given_as_a_protocol_a_cell_or_a_lab_names_the_file(tmp_path):
    binary = tmp_path / "photo.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    refused(["dryrun", str(binary), "--sim", "lto_bare_thinfilm"], str(binary), "not a text file")
    refused(["dryrun", "lto_formation", "--sim", str(binary)], str(binary), "not a text file")
    refused(["protocol", "show", str(binary)], str(binary), "not a text file")
    refused(["runs", "--lab", str(binary)], str(binary), "not a text file")


def test_a_lab_file_that_does_not_validate_names_the_file_and_the_field(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text("lab: x\nchannels:\n  ch1: {driver: simulated, cell: lto_bare_thinfilm, sped: 3}\n")
    refused(["run", "lto_formation", "--channel", "ch1", "--lab", str(lab)], str(lab), "channels.ch1.sped")
    refused(["runs", "--lab", str(tmp_path / "missing.yaml")], "missing.yaml", "does not exist")


def test_an_unknown_channel_and_a_bad_speed_name_what_is_allowed():
    refused(["run", "lto_formation", "--channel", "nope"], "'nope'", "ch1, ch2")
    refused(["run", "lto_formation", "--channel", "ch1", "--speed", "-3"], "--speed", "'-3'")
    refused(["dryrun", "lto_formation", "--sim", "lto_bare_thinfilm", "--speed", "fast"], "--speed", "'fast'")
    refused(["dryrun", "lto_formation", "--sim", "no-such-cell"], "'no-such-cell'")


def test_a_store_that_cannot_be_written_names_the_store(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    unwritable = str(blocker / "labtwin.db")
    refused(["runs", "--store", unwritable], unwritable, "--store")
    refused(["export", "some-run", "--store", unwritable], unwritable)
    refused(["analyze", "cycling", "some-run", "--store", unwritable], unwritable)


def test_a_spectrum_with_too_few_points_names_the_file(tmp_path):
    spectrum = tmp_path / "short.csv"
    spectrum.write_text("frequency_Hz,z_real_ohm,z_imag_ohm\n1000,10,-1\n100,12,-3\n")
    refused(["analyze", "eis", str(spectrum)], "short.csv", "2 points", "at least 3")


def test_version_comes_from_the_package_metadata():
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"labtwin {version('labtwin')}"


# --------------------------------------------------------------------------- channels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def broker_process():
    """`labtwin broker` in a process of its own (the CLI's checks run their own event loop)."""
    port = _free_port()
    proc = subprocess.Popen(
        [*LABTWIN, "broker", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
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
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(15)


def _retain_status(url: str, lab: str, status: ChannelStatus) -> None:
    async def publish() -> None:
        from labtwin import bus as busmod
        from labtwin.bus import Bus

        async with Bus(url, f"errors-test-{uuid.uuid4().hex[:6]}") as bus:
            await bus.publish(busmod.topic(lab, status.channel, "status"), status, retain=True)
            await bus.flush()

    asyncio.run(publish())


def test_a_channel_with_no_agent_or_a_busy_one_is_refused_before_the_flow_starts(tmp_path, broker_process):
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        "lab: errors\nchannels:\n  ch1: {driver: simulated, cell: lto_bare_thinfilm}\n"
        "  ch2: {driver: simulated, cell: lto_bare_thinfilm}\n"
    )
    base = ["run", "lto_formation", "--lab", str(lab), "--broker", broker_process]
    refused([*base, "--channel", "ch1"], "'ch1'", "no agent", "labtwin agent --channel ch1")
    _retain_status(
        broker_process, "errors", ChannelStatus(channel="ch2", state=ChannelState.running, run_id="other-run-42")
    )
    refused([*base, "--channel", "ch2"], "'ch2'", "busy", "other-run-42")
    refused(["pause", "--channel", "ch1", "--lab", str(lab), "--broker", broker_process], "ch1")


# --------------------------------------------------------------------------- runs that end badly


@pytest.mark.usefixtures("prefect_api")
def test_a_dryrun_that_trips_a_safety_limit_exits_1(tmp_path):
    protocol = tmp_path / "trip.yaml"
    protocol.write_text(TRIPPING_PROTOCOL)
    result = runner.invoke(
        app, ["dryrun", str(protocol), "--sim", "lto_bare_thinfilm", "--out", str(tmp_path / "dry"), "--json"]
    )
    assert result.exit_code == 1, result.output
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == "failed" and "safety_limit" in summary["reason"]


def test_ctrl_c_during_a_run_stops_it_and_leaves_it_marked_interrupted(tmp_path, prefect_api):
    from prefect.settings import PREFECT_API_URL

    from labtwin.data.store import Store

    store = tmp_path / "runs.db"
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        f"lab: sigint\nstore: {store}\nchannels:\n  ch1: {{driver: simulated, cell: lto_bare_thinfilm, speed: 20, "
        "seed: 1, limits: {voltage_min_V: 0.5, voltage_max_V: 3.1}}\n"
    )
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    proc = subprocess.Popen(
        [*LABTWIN, "run", "lto_formation", "--channel", "ch1", "--lab", str(lab)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        started = False
        while not started:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the store"
            time.sleep(0.5)
            if store.exists():
                s = Store.open(str(store))
                try:
                    started = any(r.stored_samples > 0 for r in s.runs())
                finally:
                    s.close()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: run "), stderr
    s = Store.open(str(store))
    try:
        (row,) = s.runs()
    finally:
        s.close()
    assert row.run_id in lines[0]
    assert row.exit_status == "aborted" and row.reason.startswith("interrupted: Ctrl-C")
    assert row.stopped_at is not None
    assert row.cell_time_s is not None and row.cell_time_s < 5 * 3600  # stopped long before five 1C cycles ended


def test_a_run_that_does_not_exist_in_the_store_is_one_line(tmp_path):
    refused(["export", "no-such-run", "--store", str(tmp_path / "s.db")], "no-such-run")


def test_protocol_check_refuses_with_exit_1_and_one_line():
    refused(["protocol", "check", "lco_formation", "--channel", "ch1"], "voltage_max_V", code=1)


def test_a_campaign_whose_later_protocol_does_not_validate_is_refused_before_any_job(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_PROTOCOL)
    (tmp_path / "c.yaml").write_text(
        "campaign: c1\ncells:\n  - id: A\n    channels: [ch1]\n    protocols: [demo-lto-0.1C, bad.yaml]\n"
    )
    refused(["campaign", "run", str(tmp_path / "c.yaml"), "--store", str(tmp_path / "s.db")], "bad.yaml", "c_rate")
    assert not (tmp_path / "s.db").exists()  # nothing ran, nothing was stored


def test_a_dryrun_out_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    refused(
        ["dryrun", "demo-lto-0.1C", "--sim", "lto_bare_thinfilm", "--out", str(tmp_path / "a-file" / "out")], "--out"
    )


def test_db_current_on_a_file_that_is_no_database_is_one_line(tmp_path):
    (tmp_path / "g.db").write_text("garbage")
    refused(["db", "current", "--store", str(tmp_path / "g.db")], "g.db", "not a database")


def test_a_lab_file_with_an_unknown_driver_is_refused_with_its_field(tmp_path):
    (tmp_path / "lab.yaml").write_text("lab: t\nchannels:\n  ch1:\n    driver: simulatd\n    cell: lfp\n")
    refused(["runs", "--lab", str(tmp_path / "lab.yaml")], "lab.yaml", "channels.ch1.driver", "simulatd")


def test_resume_of_a_run_the_store_has_not_or_that_ended_is_one_line(tmp_path):
    from labtwin.data.store import Store
    from labtwin.documents import RunStart, RunStop

    store = tmp_path / "s.db"
    s = Store.open(store)
    s.write(
        [
            RunStart(run_id="ended-run", lab="default", channel="ch1", cell_id="c", protocol="p", n_steps=1),
            RunStop(run_id="ended-run", channel="ch1", exit_status="success"),
            RunStart(run_id="elsewhere", lab="default", channel="ch2", cell_id="c", protocol="p", n_steps=1),
        ]
    )
    s.close()
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        "lab: default\nchannels:\n"
        "  ch1: {driver: simulated, cell: lto_bare_thinfilm, limits: {voltage_min_V: 0.5, voltage_max_V: 3.0}}\n"
        "  ch2: {driver: simulated, cell: lto_bare_thinfilm, limits: {voltage_min_V: 0.5, voltage_max_V: 3.0}}\n"
    )
    base = ["run", "lto_formation", "--channel", "ch1", "--lab", str(lab), "--store", str(store)]
    refused([*base, "--resume", "nope"], "--resume", "no run 'nope'")
    refused([*base, "--resume", "ended-run"], "--resume ended-run", "already ended (success)")
    refused([*base, "--resume", "elsewhere"], "channel ch2", "--channel ch2")
