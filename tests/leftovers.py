"""What a test session leaves behind: processes it started that still run, retained messages on the shared broker.

A SIGKILLed `labtwin campaign run` takes only itself down: the Prefect server it started (a uvicorn process,
~230 MB) is re-parented to PID 1 and serves on for ever. An agent's retained status stays on Mosquitto after
its test. Neither fails a test, so the session checks for both at its end (tests/conftest.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Started:
    """A process as the session saw it: pid and start time together, since pids are reused."""

    pid: int
    create_time: float


def _key(proc: psutil.Process) -> Started | None:
    try:
        return Started(proc.pid, proc.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def running_now() -> set[Started]:
    """Every process alive now: whatever is in this set was not started by the session that takes it first."""
    return {key for proc in psutil.process_iter() if (key := _key(proc)) is not None}


def _under(value: str, roots: Iterable[Path]) -> bool:
    """True when value is one of the roots or inside one (``/tmp/pytest-1`` is not inside ``/tmp/pytest-12``)."""
    return any(value == str(root) or str(root) + os.sep in value for root in roots)


def _tied_to(proc: psutil.Process, roots: list[Path]) -> bool:
    """A process whose command line, working directory or PREFECT_HOME lies in the session's temporary dirs:
    it was started for this session even after its parent died and PID 1 adopted it."""
    try:
        if any(_under(arg, roots) for arg in proc.cmdline()):
            return True
        if _under(proc.cwd(), roots):
            return True
        home = proc.environ().get("PREFECT_HOME")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return home is not None and _under(home, roots)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started_and_still_running(before: set[Started], roots: list[Path], grace_s: float = 10.0) -> list[psutil.Process]:
    """The processes started since ``before`` that are this session's (its descendants, or tied to its
    temporary dirs) and still alive after ``grace_s`` (a process being stopped gets time to finish)."""
    me = psutil.Process()
    found: dict[int, psutil.Process] = {}
    try:
        for child in me.children(recursive=True):
            found[child.pid] = child
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        if proc.pid != me.pid and proc.pid not in found and _tied_to(proc, roots):
            found[proc.pid] = proc
    new = [p for p in found.values() if _key(p) not in before and _alive(p)]
    _, alive = psutil.wait_procs(new, timeout=grace_s)
    return [p for p in alive if _alive(p)]


def describe(proc: psutil.Process) -> str:
    try:
        command = " ".join(proc.cmdline())
        parent = proc.ppid()
        rss_MB = proc.memory_info().rss / 1e6
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return f"pid {proc.pid} (gone while being described)"
    return f"pid {proc.pid} (parent {parent}, {rss_MB:.0f} MB): {command[:300]}"


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL the leftovers (and their children) once reported, so a failed session does not leave them too."""
    for proc in procs:
        try:
            family = [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for member in family:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=5)


# ---------------------------------------------------------------------------------------------- retained topics


def retained_messages(host: str, port: int, filters: list[str], quiet_s: float = 1.0) -> dict[str, bytes]:
    """The retained messages under these topic filters: a broker sends them right after the subscription, so
    once nothing has arrived for ``quiet_s`` they are all in."""
    import paho.mqtt.client as mqtt

    found: dict[str, bytes] = {}
    subscribed = threading.Event()
    last = [time.monotonic()]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"labtwin-test-leftovers-{os.getpid()}")

    def on_connect(client, userdata, flags, reason_code, properties):
        client.subscribe([(f, 1) for f in filters])

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        last[0] = time.monotonic()
        subscribed.set()

    def on_message(client, userdata, message):
        last[0] = time.monotonic()
        if message.retain and message.payload:
            found[message.topic] = message.payload
        elif message.retain:
            found.pop(message.topic, None)

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise RuntimeError(f"the broker at {host}:{port} did not acknowledge the subscription to {filters}")
        while time.monotonic() - last[0] < quiet_s:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return found


def clear_retained(host: str, port: int, topics: Iterable[str]) -> None:
    """An empty retained payload is MQTT's way to delete a topic's retained message."""
    import paho.mqtt.client as mqtt

    topics = list(topics)
    if not topics:
        return
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"labtwin-test-clear-{os.getpid()}")
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
