"""Clocks for channels: the wall clock for real instruments, a virtual one for simulated cells.

A simulated potentiostat and the agent that drives it share one clock handed
in from outside (as ophyd-async does), so "how fast does this channel run" is
configuration: ``speed=1`` is real time, ``speed=1000`` a thousand cell seconds
per wall second, ``speed=None`` as fast as the CPU allows.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Cell time in seconds; ``sleep`` waits one sampling interval of cell time."""

    @property
    def speed(self) -> float | None:
        """Cell seconds per wall second; None: as fast as the CPU allows. Read-only here, so a clock whose
        speed is always a number (the wall clocks) is a Clock too."""
        ...

    def now(self) -> float: ...

    def sleep(self, dt_s: float) -> None: ...


class WallClock:
    """Real time, for real instruments: the cell lives on the wall clock."""

    speed: float | None = 1.0

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, dt_s: float) -> None:
        time.sleep(dt_s)


class ScaledWallClock:
    """The wall clock, optionally sped up: what a real-instrument channel runs on.

    A bench instrument lives in real time (``speed=1``). A wire-level emulator
    (``labtwin emulate ... --speed N``) runs its cell N times faster than the
    wall; the agent that drives it through the real driver must keep the same
    pace, so sampling intervals and step times are read as cell seconds.
    Unlike ``VirtualClock`` nothing waits on anyone: both ends read the wall.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise ValueError(f"a wall clock's speed must be a positive number, got {speed}")
        self.speed = float(speed)
        self._origin = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._origin) * self.speed

    def sleep(self, dt_s: float) -> None:
        if dt_s < 0:
            raise ValueError(f"cannot sleep a negative time ({dt_s} s)")
        time.sleep(dt_s / self.speed)


class VirtualClock:
    """Cell time that advances only when someone sleeps; paced against the wall clock.

    Pacing is against a fixed origin rather than per sleep, so small sleep
    overheads do not accumulate into drift at high speeds.
    """

    def __init__(self, speed: float | None = None, start_s: float = 0.0) -> None:
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be positive or None (as fast as possible), got {speed}")
        self.speed = speed
        self._now_s = start_s
        self._lock = threading.Lock()
        self._wall_origin = time.monotonic()
        self._cell_origin = start_s

    def now(self) -> float:
        return self._now_s

    def sleep(self, dt_s: float) -> None:
        if dt_s < 0:
            raise ValueError(f"cannot sleep a negative time ({dt_s} s)")
        with self._lock:
            self._now_s += dt_s
            target = self._now_s
        if self.speed is not None:
            wall_due = self._wall_origin + (target - self._cell_origin) / self.speed
            delay = wall_due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                # Fell far behind (e.g. a paused debugger): re-anchor rather than sprint.
                self._wall_origin = time.monotonic()
                self._cell_origin = target


def parse_speed(text: str | float | None) -> float | None:
    """'max' (or None) is as fast as possible; otherwise a positive number."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        if text.strip().lower() in {"max", "inf", "fastest"}:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"speed must be a positive number or 'max', got {text!r}") from None
    if value <= 0:
        raise ValueError(f"speed must be a positive number or 'max', got {text!r}")
    return value
