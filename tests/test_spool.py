"""The agent's spool (issue 14): a journal on disk before the bus, and a sample loop that never waits on the network."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labtwin.agent import Agent
from labtwin.agent.spool import Spool, SpoolBusy
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.wiring import build_channel
from labtwin.config.secure_lab import Identity, acl_rules
from labtwin.data.recorder import Recorder, RunTrack
from labtwin.data.store import Store
from labtwin.documents import EndConditions, Limits, ResendRequest, StepCommand, StepKind
from labtwin.security.policy import may_command, may_publish
from labtwin.security.profile import Role
from tests.helpers import run_steps_by_hand, sim_lab

LABTWIN = str(Path(sys.executable).parent / "labtwin")

# ------------------------------------------------------------------ the journal


def test_entries_survive_a_reopen_in_order_and_are_handed_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    for seq in range(5):
        spool.append("labtwin/v1/l/ch/data", f"b{seq}".encode(), "r1", seq)
    spool.append("labtwin/v1/l/ch/event", b"stop", "r1")
    spool.mark_handed([e.ident for e in spool.unhanded()[:2]])
    spool.close()
    again = Spool(tmp_path / "s.db")  # a killed agent's next start: what it never handed over goes out then
    assert [e.payload for e in again.unhanded()] == [b"b2", b"b3", b"b4", b"stop"]
    assert [e.seq for e in again.batches("r1", 1, 3)] == [1, 2, 3]
    assert [e.payload for e in again.events("r1")] == [b"stop"]
    assert again.forget_run("r1") == 6
    assert again.unhanded() == []
    again.close()
    assert not (tmp_path / "s.db").exists(), "an empty spool leaves no file behind"


def test_old_entries_are_pruned_and_a_large_spool_warns(tmp_path: Path, caplog) -> None:
    spool = Spool(tmp_path / "s.db", warn_bytes=1)
    for i in range(256):
        spool.append("t/data", b"x" * 100, "r", i)
    assert "past its warning bound" in caplog.text
    spool.close()
    assert Spool(tmp_path / "s.db", keep_days=0).unhanded() == []


def test_run_track_missing_ranges() -> None:
    track = RunTrack(lab="l", channel="ch")
    for seq in (0, 1, 2, 5, 6, 9):
        track.add(seq)
    assert track.contiguous == 2
    assert track.missing(9) == [(3, 4), (7, 8)]
    assert track.missing(12) == [(3, 4), (7, 8), (10, 12)]
    for seq in (3, 4, 7, 8):
        track.add(seq)
    assert track.contiguous == 9 and not track.above


def test_the_recorder_may_ask_for_a_resend_and_nothing_else() -> None:
    assert may_publish(Role.recorder, None, "channel", "ch1", "cmd")
    assert may_command(Role.recorder, "resend")
    assert not any(may_command(Role.recorder, k) for k in ("start_run", "step", "stop_run", "pause_run"))
    for kind in ("data", "event", "status"):
        assert not may_publish(Role.recorder, None, "channel", "ch1", kind)
    rules = acl_rules("lab", ["ch1", "ch2"], Identity(name="recorder", role=Role.recorder, username="recorder"))
    assert {t for a, t in rules if a in ("write", "readwrite")} == {"labtwin/v1/lab/ch1/cmd", "labtwin/v1/lab/ch2/cmd"}
    ResendRequest(run_id="r", channel="ch", ranges=[(3, 4)], events=True)


# ------------------------------------------------------------------ an outage longer than the outbox


class _CountingReads:
    """Wraps a driver: when each read happened (wall clock), to see the sample loop go on while the bus cannot."""

    def __init__(self, driver) -> None:
        self._driver = driver
        self.reads_at: list[float] = []

    def read(self):
        self.reads_at.append(time.monotonic())
        return self._driver.read()

    def __getattr__(self, name):
        return getattr(self._driver, name)


async def test_broker_down_past_the_outbox_the_step_reads_on_and_every_batch_is_stored(unique_lab, tmp_path) -> None:
    """An outbox of 4 messages, a batch per sample, the broker away 1.5 s (hundreds of batches): readings go on at
    the step's interval throughout (before, the full outbox held the sample loop), the spool holds the batches,
    and the store has every seq exactly once when the broker is back (the restarted broker lost the recorder's
    session: gap filling fetches what the broker dropped, if it dropped any)."""
    broker = await EmbeddedBroker().start()
    config = sim_lab(unique_lab, {"ch": "lco_lgps_glassy"}, Limits(voltage_min_V=1.9, voltage_max_V=3.8), speed=200)
    built = build_channel("ch", config.channel("ch"), 200, unique_lab)
    driver = _CountingReads(built.driver)
    store = Store.open(tmp_path / "store.db")
    stop = asyncio.Event()
    agent = Agent(
        lab=unique_lab,
        channel="ch",
        driver=driver,  # type: ignore[arg-type]
        clock=built.clock,
        broker_url=broker.url,
        channel_limits=config.channel("ch").limits,
        cell_id="c",
        batch_size=1,
        spool_dir=tmp_path / "spool",
        outbox_size=4,
    )
    recorder = Recorder(broker.url, store, unique_lab, client_id=f"rec-{unique_lab}", resend_every_s=0.5)
    tasks = [asyncio.create_task(recorder.serve(stop)), asyncio.create_task(agent.serve(stop))]
    # 1 800 s of cell time at 1 s sampling, x200: about 9 s of wall time.
    cmd = StepCommand(run_id="out", step_index=0, step=StepKind.rest, end=EndConditions(time_s=1800))
    try:
        await recorder.wait_ready()
        await agent.wait_ready()
        driving = asyncio.create_task(run_steps_by_hand(broker.url, unique_lab, "ch", "out", [cmd]))
        await asyncio.sleep(2.0)
        await asyncio.wait_for(
            broker.stop(), 30
        )  # bounded: a hang is a failure, not a stuck suite (amqtt takes >10 s loaded)
        down_at = time.monotonic()
        await asyncio.sleep(1.5)
        up_at = time.monotonic()
        await asyncio.wait_for(broker.start(), 30)
        try:
            _, run_stop = await asyncio.wait_for(driving, 60)
        except TimeoutError:  # the hand driver's own subscription may miss an event across the restart
            run_stop = None
        await recorder.wait_stored("out", 90)  # gap filling on a loaded machine
        seqs = store.seqs("out")
        samples = store.sample_count("out")
        for _ in range(250):  # the recorder's confirmation reaches the agent, which drops the run from its spool
            if agent.spool is not None and not agent.spool.batches("out", 0, 10**6):
                break
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
        await asyncio.wait_for(broker.stop(), 10)
        store.close()
    during = [t for t in driver.reads_at if down_at + 0.1 < t < up_at - 0.1]
    # 200 readings per wall second at 1 s of cell time each (a full outbox used to stop them within ms of the
    # broker going); a loaded machine is allowed a factor of 10 and half-second stalls.
    assert len(during) > 1.3 * 200 / 10, len(during)
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert max(gaps) < 0.5, max(gaps)
    assert samples == 1800
    assert seqs == list(range(len(seqs))) and len(seqs) == 1800
    if run_stop is not None:
        assert run_stop.n_samples == 1800
    assert recorder.stats.runs_complete == 1  # confirmed to the agent, which dropped the run from its spool
    assert list((tmp_path / "spool").iterdir()) == [], "the confirmed run left nothing in the spool"


# ------------------------------------------------------------------ one agent per spool


def test_a_second_spool_of_the_same_file_is_refused_naming_the_file_and_the_holder(tmp_path: Path) -> None:
    first = Spool(tmp_path / "s.db")
    first.append("t/event", b"x", "r")
    with pytest.raises(SpoolBusy) as refused:
        Spool(tmp_path / "s.db")  # flock is per open file: a second one in the same process is refused too
    assert str(tmp_path / "s.db") in str(refused.value) and f"pid {os.getpid()}" in str(refused.value)
    assert [e.payload for e in first.unhanded()] == [b"x"], "the refused one did not touch the holder's spool"
    first.close()
    again = Spool(tmp_path / "s.db")  # released at close
    again.forget_run("r")
    again.close()
    assert list(tmp_path.iterdir()) == [], "an empty spool leaves neither its file nor its lock file"


_HOLD = """
import sys, time
from pathlib import Path
from labtwin.agent.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.append("t/event", b"held", "r")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_agent_process_is_refused_in_one_line_and_a_killed_holder_frees_the_spool(tmp_path: Path) -> None:
    """Two real processes: one holds the channel's spool, `labtwin agent` of the same lab and channel in the same
    directory exits 2 with one line naming the file and the holder's pid; kill -9 of the holder frees it."""
    lab = f"lock{os.getpid()}"
    (tmp_path / "lab.yaml").write_text(
        f"lab: {lab}\nchannels:\n  ch: {{driver: simulated, cell: lto_bare_thinfilm, "
        "limits: {voltage_min_V: 0.5, voltage_max_V: 3.0}}\n"
    )
    path = tmp_path / "labtwin-data" / "spool" / f"{lab}-ch.db"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        second = subprocess.run(
            [LABTWIN, "agent", "--channel", "ch", "--lab", "lab.yaml", "--broker", "mqtt://127.0.0.1:9"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith("error: spool ") and f"{lab}-ch.db" in lines[0], lines[0]
        assert f"pid {holder.pid}" in lines[0], lines[0]
    finally:
        holder.kill()  # SIGKILL: no close, no unlock; the kernel drops the flock with the process
        holder.wait(10)
    again = Spool(path)
    assert [e.payload for e in again.unhanded()] == [b"held"], "the dead holder's entries are the next agent's"
    again.close()
