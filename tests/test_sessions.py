"""Persistent sessions that cannot be hijacked (issue 14): unguessable client ids, one holder per directory.

Measured before: a client connecting as ``recorder-<lab>`` took the recorder's session over 14 times in 8 s
and cost the store 289 samples. The recorder and twin now claim ``<name>-<random token>`` from their working
directory; a second one started there is refused, and a bus whose connection keeps being taken says so.
"""

from __future__ import annotations

import asyncio
import logging
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from labtwin.bus import Bus
from labtwin.bus.sessions import SessionInUse, claim_session
from labtwin.data.recorder import Recorder
from labtwin.data.store import Store
from tests.mosquitto_proc import MosquittoProcess

LABTWIN = str(Path(sys.executable).parent / "labtwin")


def test_a_session_id_is_random_private_and_stable_across_restarts(tmp_path):
    with claim_session("recorder-lab1", tmp_path / "a") as first:
        first_id = first.client_id
    with claim_session("recorder-lab1", tmp_path / "a") as again:
        assert again.client_id == first_id  # the restarted recorder gets its persistent session back
    with claim_session("recorder-lab1", tmp_path / "b") as elsewhere:
        assert elsewhere.client_id != first_id
    assert first_id.startswith("recorder-lab1-") and len(first_id) == len("recorder-lab1-") + 16
    mode = stat.S_IMODE((tmp_path / "a" / "recorder-lab1.id").stat().st_mode)
    assert mode == 0o600


def test_a_second_holder_in_the_same_directory_is_refused_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from labtwin.bus.sessions import claim_session; "
            f"s = claim_session('twin-lab1', {str(tmp_path)!r}); print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SessionInUse, match=rf"pid {holder.pid}\).*stop it first"):
            claim_session("twin-lab1", tmp_path)
    finally:
        holder.kill()
        holder.wait(10)
    with claim_session("twin-lab1", tmp_path):  # the holder's death released it
        pass


async def test_a_client_using_the_old_guessable_id_takes_nothing_from_the_recorder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MosquittoProcess(tmp_path / "broker") as broker:
        store = Store.open(tmp_path / "s.db")
        recorder = Recorder(broker.url, store, "sess")
        stop = asyncio.Event()
        serving = asyncio.create_task(recorder.serve(stop))
        try:
            await recorder.wait_ready()
            for _ in range(10):  # what the probe did: connect as recorder-<lab>, again and again
                async with aiomqtt.Client("127.0.0.1", broker.port, identifier="recorder-sess", clean_session=False):
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            assert recorder.bus is not None and recorder.bus.stats.reconnects == 0
            assert recorder.bus.client_id != "recorder-sess"
        finally:
            stop.set()
            await asyncio.wait_for(serving, 15)
            store.close()


async def test_two_clients_fighting_over_one_id_are_said_so(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="labtwin.bus.client")
    with MosquittoProcess(tmp_path / "broker") as broker:
        async with Bus(broker.url, "fought-over", persistent=True) as a, Bus(broker.url, "fought-over") as b:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and "taking its session over" not in caplog.text:
                await asyncio.sleep(0.2)
            fights = a.stats.reconnects + b.stats.reconnects
    assert "another client may be using client id 'fought-over'" in caplog.text
    assert fights >= 3


def test_a_second_recorder_started_in_the_same_directory_exits_with_one_line(tmp_path):
    with MosquittoProcess(tmp_path / "broker") as broker:
        args = [LABTWIN, "record", "--broker", broker.url, "--store", str(tmp_path / "s.db")]
        first = subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert first.stderr is not None
            deadline = time.monotonic() + 60
            while not (tmp_path / "labtwin-data" / "sessions").is_dir() or not any(
                (tmp_path / "labtwin-data" / "sessions").glob("recorder-*.id")
            ):
                assert time.monotonic() < deadline and first.poll() is None, "the first recorder never started"
                time.sleep(0.2)
            second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        finally:
            first.terminate()
            first.wait(15)
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: another recorder-") and f"pid {first.pid}" in lines[-1], second.stderr
