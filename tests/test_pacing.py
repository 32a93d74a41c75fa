"""The dry-run pacer (labtwin/twin/pacing.py): a simulated channel waits for its twin, never for ever."""

from __future__ import annotations

import threading
import time

from labtwin.twin import pacing
from labtwin.twin.pacing import FollowProgress


def test_a_run_the_twin_does_not_follow_is_not_waited_for():
    progress = FollowProgress()
    started = time.monotonic()
    assert progress.wait("r1", 100.0) is True
    assert time.monotonic() - started < 0.1


def test_the_channel_waits_until_the_twin_has_followed_that_far():
    progress = FollowProgress()
    progress.followed("r1", 10.0)
    threading.Timer(0.2, progress.followed, ("r1", 50.0)).start()
    started = time.monotonic()
    assert progress.wait("r1", 40.0) is True
    assert 0.15 < time.monotonic() - started < 2.0


def test_an_acting_anomaly_holds_the_channel_until_the_flow_acts(monkeypatch):
    monkeypatch.setattr(pacing, "ACTION_HOLD_S", 0.3)
    progress = FollowProgress()
    progress.followed("r1", 50.0)
    progress.hold("r1")
    aborted = threading.Event()
    threading.Timer(0.1, aborted.set).start()
    started = time.monotonic()
    assert progress.wait("r1", 40.0, aborted.is_set) is True  # the abort, before the hold ran out
    assert time.monotonic() - started < 0.25
    started = time.monotonic()
    assert progress.wait("r1", 40.0) is True  # nobody acted: the hold runs out and the channel goes on
    assert time.monotonic() - started < 0.5


def test_a_twin_that_stopped_following_never_holds_the_channel(monkeypatch):
    monkeypatch.setattr(pacing, "MAX_WAIT_S", 0.2)
    progress = FollowProgress()
    progress.followed("r1", 10.0)
    started = time.monotonic()
    assert progress.wait("r1", 40.0) is False
    assert time.monotonic() - started < 1.0
    progress.ended("r1")
    assert progress.wait("r1", 40.0) is True
