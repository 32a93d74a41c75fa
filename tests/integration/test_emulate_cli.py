"""The README's real-instrument path, as a user runs it: `labtwin emulate keithley2450` in one process,
`labtwin run PROTOCOL --channel k1 --lab lab.yaml` in another; the run goes through the real driver."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

LABTWIN = str(Path(sys.executable).parent / "labtwin")

PROTOCOL = """
metadata: {name: rest and half cycle, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 5}
safety: {voltage_min_V: 0.8, voltage_max_V: 2.6}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -2.0, until: {voltage_V: 1.2, time_s: 2400}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_labtwin_run_drives_an_emulated_keithley_2450_from_a_lab_file(tmp_path):
    port = free_port()
    emulator = subprocess.Popen(
        [
            LABTWIN,
            "emulate",
            "keithley2450",
            "--cell",
            "lto_bare_thinfilm",
            "--port",
            str(port),
            "--speed",
            "300",
            "--seed",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = emulator.stderr.readline() + emulator.stderr.readline()
        assert f"TCPIP::127.0.0.1::{port}::SOCKET" in banner, banner
        (tmp_path / "proto.yaml").write_text(PROTOCOL)
        (tmp_path / "lab.yaml").write_text(
            "lab: bench\nchannels:\n  k1:\n    driver: keithley2450\n"
            f'    resource: "TCPIP::127.0.0.1::{port}::SOCKET"\n    speed: 300\n    nominal_capacity_Ah: 5.18e-5\n'
            f"    audit: {tmp_path / 'audit.jsonl'}\n"
            "    limits: {voltage_min_V: 0.8, voltage_max_V: 2.6, current_max_A: 0.001}\n"
        )
        started = time.monotonic()
        done = subprocess.run(
            [
                LABTWIN,
                "run",
                str(tmp_path / "proto.yaml"),
                "--channel",
                "k1",
                "--lab",
                str(tmp_path / "lab.yaml"),
                "--store",
                str(tmp_path / "s.db"),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        summary = json.loads(done.stdout)
        assert summary["exit_status"] == "success"
        assert [s["reason"] for s in summary["step_ends"]] == ["end_condition:time_s", "end_condition:voltage_V"]
        assert summary["n_samples"] > 40 and time.monotonic() - started < 120
        sent = [json.loads(line)["text"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert sent[0] == "*RST" and ":OUTP:CURR:SMOD HIMP" in sent[:4]
    finally:
        emulator.terminate()
        emulator.wait(10)


def test_labtwin_run_against_an_address_nobody_answers_says_so(tmp_path):
    port = free_port()
    (tmp_path / "lab.yaml").write_text(
        f'lab: bench\nchannels:\n  k1:\n    driver: keithley2450\n    resource: "TCPIP::127.0.0.1::{port}::SOCKET"\n    timeout_s: 1\n'
    )
    done = subprocess.run(
        [
            LABTWIN,
            "run",
            "lto_formation",
            "--channel",
            "k1",
            "--lab",
            str(tmp_path / "lab.yaml"),
            "--store",
            str(tmp_path / "s.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    said = " ".join(done.stderr.split())  # the console wraps long lines
    assert f"TCPIP::127.0.0.1::{port}::SOCKET: connection refused at '*RST': is the instrument on" in said
    assert "Traceback" not in done.stderr  # a clear error, not a stack dump
