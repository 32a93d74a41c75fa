"""Chaos over separate processes (issue 14): one protocol run while the lab around it fails, at seeded times.

Processes, as a lab runs them: a Mosquitto the test starts (its own port and config, no persistence), the
channel's agent (`labtwin agent`, reaching the broker through a TCP proxy the test controls), a recorder
(`labtwin record`) and the run (`labtwin run`, a Prefect flow). During the run, in an order and at times drawn
from a fixed seed: the broker killed (SIGKILL) and started again, the recorder killed and started again, a
network partition of several seconds between the agent and the broker, and a graceful broker restart (SIGINT).
The protocol's last step charges on time alone, so it must trip the channel's voltage limit.

Asserted: the run ends as its protocol says (failed on voltage_max_V at its last step, nothing earlier), every
sample the agent took is stored exactly once (the RunStop's count, contiguous seqs), every step's end is stored,
the limit tripped within one sample, and every fault really happened (each process restarted, reconnects seen).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time

import yaml

from labtwin.data.store import Store
from tests.lab_processes import LABTWIN, Service, run_started
from tests.mosquitto_proc import MosquittoProcess
from tests.tcp_proxy import TcpProxy

SEED = 20261202
VOLTAGE_MAX_V = 3.0

PROTOCOL = """
metadata: {name: chaos}
record: {interval_s: 2}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 300}
  - repeat: 2
    steps:
      - cc: {c_rate: -2.0, until: {voltage_V: 1.0}}
      - cc: {c_rate: 2.0, until: {voltage_V: 2.5}}
  - cc: {c_rate: 2.0, until: {time_s: 4000}}
"""
N_STEPS = 6


async def test_a_run_through_broker_recorder_and_network_faults_loses_nothing(tmp_path):
    rng = random.Random(SEED)
    broker = MosquittoProcess(tmp_path / "broker").start()
    proxy = await TcpProxy("127.0.0.1", broker.port).start()
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        yaml.safe_dump(
            {
                "lab": f"chaos{os.getpid()}",
                "channels": {
                    "ch": {
                        "driver": "simulated",
                        "cell": "lto_bare_thinfilm",
                        "speed": 200,
                        "seed": 7,
                        "limits": {"voltage_min_V": 0.5, "voltage_max_V": VOLTAGE_MAX_V},
                    }
                },
            }
        )
    )
    proto = tmp_path / "chaos.yaml"
    proto.write_text(PROTOCOL)
    store_path = tmp_path / "s.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LABTWIN_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    direct = ["--lab", str(lab), "--broker", broker.url]
    agent = Service(
        "agent",
        [LABTWIN, "agent", "--channel", "ch", "--lab", str(lab), "--broker", f"mqtt://127.0.0.1:{proxy.port}"],
        tmp_path,
        env,
    )
    recorder = Service("recorder", [LABTWIN, "record", *direct, "--store", str(store_path)], tmp_path, env)
    run = Service("run", [LABTWIN, "run", str(proto), "--channel", "ch", *direct, "--json"], tmp_path, env)
    faults: list[str] = []
    try:
        agent.start()
        recorder.start()
        await asyncio.sleep(3.0)
        run.start()
        deadline = time.monotonic() + 90
        while run_started(store_path) is None:
            failed = run.proc is not None and run.proc.poll() is not None
            assert not failed and time.monotonic() < deadline, f"no run started:\n{run.logs()}\n{agent.logs()}"
            await asyncio.sleep(0.3)

        async def broker_kill() -> None:
            broker.kill()
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            broker.start()

        async def broker_graceful() -> None:
            broker.stop()
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            broker.start()

        async def recorder_kill() -> None:
            recorder.kill()
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            recorder.start()

        async def partition() -> None:
            proxy.partition()
            await asyncio.sleep(rng.uniform(4.0, 8.0))
            proxy.heal()

        plan = [broker_kill, recorder_kill, partition, broker_graceful]
        rng.shuffle(plan)
        for fault in plan:
            await asyncio.sleep(rng.uniform(1.0, 4.0))
            if run.proc is None or run.proc.poll() is not None:
                break
            faults.append(fault.__name__)
            await fault()
        assert run.proc is not None
        returncode = await asyncio.to_thread(run.proc.wait, 240)
        out = (tmp_path / "run.0.log").read_text(errors="replace")
        summary = json.loads(out[out.index("{") : out.rindex("}") + 1])
        run_id = summary["run_id"]
        deadline = time.monotonic() + 60
        while True:  # the recorder fills what it missed from the agent's spool
            store = Store.open(store_path, read_only=True)
            try:
                _, stop = store.run_documents(run_id)
                stored = store.sample_count(run_id)
                seqs = store.seqs(run_id)
                ends = store.step_events(run_id)
                samples = store.samples(run_id)
            finally:
                store.close()
            if stop is not None and stored == stop.n_samples and len(ends) == N_STEPS:
                break
            assert time.monotonic() < deadline, f"store has {stored} samples, {len(ends)} step ends; stop {stop}"
            await asyncio.sleep(0.5)
    finally:
        run.kill()
        agent.kill()
        recorder.kill()
        await proxy.close()
        broker.kill()
    print(f"chaos: faults {faults}, {stored} samples, run {summary['exit_status']}: {summary.get('reason', '')}")
    assert len(faults) == 4, f"the run ended before every fault: {faults}"
    assert recorder.starts == 2
    assert returncode == 1 and summary["exit_status"] == "failed", summary
    assert "voltage_max_V" in summary["reason"] and f"step {N_STEPS - 1}" in summary["reason"], summary["reason"]
    assert stored == stop.n_samples and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert sorted(e.step_index for e in ends) == list(range(N_STEPS))
    over = samples["voltage_V"] > VOLTAGE_MAX_V
    assert over.sum() <= 1, f"{over.sum()} samples above the limit: it tripped late"
