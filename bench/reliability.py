"""The issue-14 probes, re-measured: runs over separate processes while the broker or the recorder fails.

Each run is a lab as it runs in separate processes: a Mosquitto started for the probe (its own port and config),
`labtwin agent`, `labtwin record` (SQLite) and `labtwin run` (a Prefect flow, a short LTO cycling protocol at
200x). At a random time (fixed seed) in the run one fault is injected: the broker killed (SIGKILL) with
persistence off or on, the broker restarted gracefully (SIGINT, as an upgrade does), or the recorder killed and
started again, or the supervised agent's child killed (SIGKILL; its supervisor starts it again and the flow
resumes the run). The reference is the same number of runs with no fault, in the same session. Printed per fault:
runs that ended other than success, samples the agent took that the store lacks, samples stored twice.

    python bench/reliability.py                 # 3 runs per fault
    python bench/reliability.py --runs 13       # as the issue's first probe
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.data.store import Store  # noqa: E402
from tests.lab_processes import LABTWIN, Service, run_started  # noqa: E402
from tests.mosquitto_proc import MosquittoProcess  # noqa: E402

PROTOCOL = """
metadata: {name: reliability probe}
record: {interval_s: 2}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 300}
  - repeat: 2
    steps:
      - cc: {c_rate: -2.0, until: {voltage_V: 1.0}}
      - cc: {c_rate: 2.0, until: {voltage_V: 2.5}}
"""
FAULTS = ("none", "broker-kill", "broker-kill-persistent", "broker-graceful", "recorder-kill", "agent-kill-supervised")


async def one_run(fault: str, k: int, rng: random.Random) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"labtwin-rel-{fault}-{k}-"))
    clean = False
    broker = MosquittoProcess(work / "broker", persistence=fault == "broker-kill-persistent").start()
    lab = work / "lab.yaml"
    lab.write_text(
        yaml.safe_dump(
            {
                "lab": f"rel{os.getpid()}x{k}",
                "channels": {
                    "ch": {
                        "driver": "simulated",
                        "cell": "lto_bare_thinfilm",
                        "speed": 200,
                        "limits": {"voltage_min_V": 0.5, "voltage_max_V": 3.0},
                    }
                },
            }
        )
    )
    (work / "p.yaml").write_text(PROTOCOL)
    store_path = work / "s.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LABTWIN_"))}
    env["PREFECT_HOME"] = str(work / "prefect-home")
    direct = ["--lab", str(lab), "--broker", broker.url]
    supervise = ["--supervise"] if fault == "agent-kill-supervised" else []
    agent = Service("agent", [LABTWIN, "agent", *supervise, "--channel", "ch", *direct], work, env)
    recorder = Service("recorder", [LABTWIN, "record", *direct, "--store", str(store_path)], work, env)
    run = Service("run", [LABTWIN, "run", str(work / "p.yaml"), "--channel", "ch", *direct, "--json"], work, env)
    try:
        agent.start()
        recorder.start()
        await asyncio.sleep(2.0)
        run.start()
        deadline = time.monotonic() + 120
        while run_started(store_path) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(rng.uniform(1.0, 6.0))
        if fault.startswith("broker-kill"):
            broker.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            broker.start()
        elif fault == "broker-graceful":
            broker.stop()
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            broker.start()
        elif fault == "agent-kill-supervised":  # the supervisor's child, by the pid it printed
            started = re.findall(r"agent started \(pid (\d+)\)", (work / "agent.0.log").read_text(errors="replace"))
            os.kill(int(started[-1]), signal.SIGKILL)
        elif fault == "recorder-kill":
            recorder.kill()
            await asyncio.sleep(rng.uniform(2.0, 10.0))
            recorder.start()
        assert run.proc is not None
        await asyncio.to_thread(run.proc.wait, 300)
        out = (work / "run.0.log").read_text(errors="replace")
        try:
            summary = json.loads(out[out.index("{") : out.rindex("}") + 1])
        except ValueError:
            return {"status": "no summary", "lost": None, "twice": 0}
        run_id = summary["run_id"]
        lost: int | None = None
        twice = 0
        for _ in range(120):
            store = Store.open(store_path, read_only=True)
            try:
                _, stop = store.run_documents(run_id)
                stored = store.sample_count(run_id)
                times = store.samples(run_id)["time_s"]
            finally:
                store.close()
            if stop is not None:
                lost = stop.n_samples - stored
                twice = len(times) - len(set(times.tolist()))
                if lost == 0:
                    break
            await asyncio.sleep(0.5)
        clean = summary["exit_status"] == "success" and lost == 0 and twice == 0
        return {"status": summary["exit_status"], "lost": lost, "twice": twice, "reason": summary.get("reason", "")}
    finally:
        run.kill()
        agent.kill()
        recorder.kill()
        broker.kill()
        if clean:  # a run that went wrong keeps its folder (logs, store, spool) for a look; a clean one leaves none
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work} for a look", file=sys.stderr)


async def main(runs: int, seed: int) -> int:
    rng = random.Random(seed)
    bad = 0
    print(f"{'fault':24} {'runs':>4} {'not success':>11} {'samples lost':>12} {'stored twice':>12}")
    for fault in FAULTS:
        results = [await one_run(fault, k, rng) for k in range(runs)]
        failed = sum(r["status"] != "success" for r in results)
        lost = sum(int(r["lost"]) if r["lost"] is not None else 0 for r in results)
        unknown = sum(r["lost"] is None for r in results)
        twice = sum(int(r["twice"]) for r in results)
        bad += failed + lost + unknown + twice
        extra = f"  ({unknown} without a RunStop stored)" if unknown else ""
        print(f"{fault:24} {runs:>4} {failed:>11} {lost:>12} {twice:>12}{extra}", flush=True)
        for r in results:
            if r["status"] != "success":
                print(f"    {r['status']}: {r.get('reason', '')}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per fault")
    p.add_argument("--seed", type=int, default=14)
    a = p.parse_args()
    sys.exit(asyncio.run(main(a.runs, a.seed)))
