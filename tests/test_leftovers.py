"""The session's own check for leftovers finds what it must: an orphaned process of the session, a retained topic."""

from __future__ import annotations

import subprocess
import sys

import psutil

from tests import leftovers

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def orphan(cwd) -> psutil.Process:
    """A process whose parent has exited: PID 1 (or a subreaper) adopts it, as it adopts a SIGKILLed
    campaign's Prefect server."""
    launcher = subprocess.run(
        [
            sys.executable,
            "-c",
            "import subprocess; print(subprocess.Popen("
            f"{SLEEPER!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    proc = psutil.Process(int(launcher.stdout))
    assert proc.ppid() != psutil.Process().pid
    return proc


def test_an_orphan_in_the_sessions_temporary_dirs_is_found_and_one_elsewhere_is_not(tmp_path):
    before = leftovers.running_now()
    ours = orphan(tmp_path)
    theirs = orphan(tmp_path.parent.parent)  # an orphan outside the roots: another session's, not ours
    try:
        found = leftovers.started_and_still_running(before, [tmp_path], grace_s=0.2)
        assert [p.pid for p in found] == [ours.pid]
        assert "time.sleep(120)" in leftovers.describe(ours)
        leftovers.kill(found)
        assert not ours.is_running()
        assert leftovers.started_and_still_running(before, [tmp_path], grace_s=0.2) == []
    finally:
        leftovers.kill([ours, theirs])


def test_a_running_child_is_found_and_one_that_was_running_before_is_not(tmp_path):
    earlier = subprocess.Popen(SLEEPER)
    try:
        before = leftovers.running_now()
        later = subprocess.Popen(SLEEPER)
        try:
            found = leftovers.started_and_still_running(before, [tmp_path], grace_s=0.2)
            assert [p.pid for p in found] == [later.pid]
            later.kill()  # not reaped yet: a zombie, which is no leftover
            assert leftovers.started_and_still_running(before, [tmp_path], grace_s=0.5) == []
        finally:
            later.kill()
            later.wait(10)
    finally:
        earlier.kill()
        earlier.wait(10)


def test_a_retained_message_is_seen_and_cleared(mosquitto_url, unique_lab):
    import paho.mqtt.publish as publish

    host, port = "127.0.0.1", 1883
    topic = f"labtwin/v1/{unique_lab}/ch/status"
    publish.single(topic, b'{"state": "idle"}', qos=1, retain=True, hostname=host, port=port)
    publish.single(f"labtwin/v1/{unique_lab}/ch/data", b"not retained", qos=1, hostname=host, port=port)
    assert leftovers.retained_messages(host, port, [f"labtwin/v1/{unique_lab}/#"]) == {topic: b'{"state": "idle"}'}
    leftovers.clear_retained(host, port, [topic])
    assert leftovers.retained_messages(host, port, [f"labtwin/v1/{unique_lab}/#"]) == {}
