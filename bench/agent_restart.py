"""SIGKILL of a supervised agent -> the Keithley 2450's output off, beside the agent's plain start time.

Issue 14 measured that a killed agent left the 2450 sourcing 1.2 mA until someone restarted it by hand. Here
`labtwin agent --supervise` serves a 2450 emulator (in this process, on its TCP socket, with an embedded broker
here too); each round starts a 1.2 mA discharge, `kill -9`s the supervisor's child by pid and times until the
emulator's output is off (the supervisor's back-off of 1 s, the new child's start, its safe state first). The
reference is the same agent's plain start: the supervisor launched to the agent's first status.

    python bench/agent_restart.py [ROUNDS]
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from labtwin import bus as busmod  # noqa: E402
from labtwin.bus import Bus  # noqa: E402
from labtwin.bus.broker import EmbeddedBroker  # noqa: E402
from labtwin.documents import (  # noqa: E402
    ChannelState,
    ChannelStatus,
    EndConditions,
    StartRun,
    StepCommand,
    StepKind,
    StopRun,
)
from labtwin.physics.library import load_cell  # noqa: E402
from labtwin.simulators.keithley2450 import Keithley2450Emulator  # noqa: E402
from labtwin.simulators.scpi_server import ScpiEmulatorThread  # noqa: E402

LABTWIN = str(Path(sys.executable).parent / "labtwin")


async def _live_status(sub: busmod.Subscription, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        doc = (await sub.get(max(0.01, deadline - time.monotonic()))).document
        if isinstance(doc, ChannelStatus) and doc.state is not ChannelState.offline:
            return


async def main(rounds: int) -> None:
    emulator = Keithley2450Emulator(load_cell("lfp"), speed=1.0, seed=3)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="labtwin-bench-restart-") as tmp, ScpiEmulatorThread(emulator) as link:
        lab = f"bench{os.getpid()}"
        channel = {
            "driver": "keithley2450",
            "resource": f"TCPIP::127.0.0.1::{link.port}::SOCKET",
            "timeout_s": 2.0,
            "nominal_capacity_Ah": 1e-3,
            "audit": str(Path(tmp) / "audit.jsonl"),
            "limits": {"voltage_min_V": 2.0, "voltage_max_V": 4.3, "current_max_A": 5e-3},
        }
        lab_file = Path(tmp) / "lab.yaml"
        lab_file.write_text(yaml.safe_dump({"lab": lab, "channels": {"k1": channel}}))
        async with EmbeddedBroker() as broker, Bus(broker.url) as bus:
            status = await bus.subscribe(busmod.topic(lab, "k1", "status"))
            launched = time.monotonic()
            supervisor = subprocess.Popen(
                [LABTWIN, "agent", "--supervise", "--channel", "k1", "--lab", str(lab_file), "--broker", broker.url],
                cwd=tmp,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            assert supervisor.stderr is not None
            threading.Thread(target=lambda: lines.extend(supervisor.stderr or ()), daemon=True).start()
            try:
                await _live_status(status, 60)
                plain_start_s = time.monotonic() - launched
                figures: list[float] = []
                backoffs: list[float] = []
                cmd = busmod.topic(lab, "k1", "cmd")
                for k in range(rounds):
                    run_id = f"round{k}"
                    await bus.publish(cmd, StartRun(run_id=run_id, channel="k1", cell_id="c", protocol="p", n_steps=1))
                    step = StepCommand(
                        run_id=run_id,
                        step_index=0,
                        step=StepKind.cc,
                        current_A=-1.2e-3,
                        end=EndConditions(time_s=3600),
                        sample_interval_s=0.1,
                    )
                    await bus.publish(cmd, step)
                    while not emulator.output:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(1.0)
                    child = [int(m.group(1)) for s in lines if (m := re.search(r"started \(pid (\d+)\)", s))][-1]
                    os.kill(child, signal.SIGKILL)
                    killed = time.monotonic()
                    while emulator.output:
                        await asyncio.sleep(0.002)
                    figures.append(time.monotonic() - killed)
                    waits = [float(m.group(1)) for s in lines if (m := re.search(r"restarting in (\S+) s", s))]
                    backoffs.append(waits[-1] if waits else float("nan"))
                    await _live_status(status, 60)
                    await bus.publish(cmd, StopRun(run_id=run_id, exit_status="aborted", reason="bench round over"))
                    await asyncio.sleep(0.5)
                    print(
                        f"round {k + 1}: SIGKILL -> output off {figures[-1]:.2f} s "
                        f"(back-off {backoffs[-1]:g} s, so {figures[-1] - backoffs[-1]:.2f} s from the new start)",
                        flush=True,
                    )
            finally:
                supervisor.send_signal(signal.SIGTERM)
                try:
                    supervisor.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(supervisor.pid, signal.SIGKILL)
    own = [f - b for f, b in zip(figures, backoffs)]
    print(
        f"SIGKILL -> output off: median {statistics.median(figures):.2f} s, max {max(figures):.2f} s over {rounds} "
        f"rounds, of which the supervisor's back-off (1 s, doubling while a child lives under 60 s); without it "
        f"median {statistics.median(own):.2f} s\n"
        f"reference, the agent's plain start (supervisor launched -> first status): {plain_start_s:.2f} s"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
