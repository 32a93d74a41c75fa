"""`labtwin campaign serve` as a lab runs it: Prefect deployments on a local Prefect server, the campaign's
jobs once and its schedule every few seconds, on two simulated channels; then what the Prefect API and the
store say happened."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from labtwin.data.store import Store
from tests.conftest import POSTGRES, reachable

LABTWIN = str(Path(sys.executable).parent / "labtwin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_db():
    """A fresh PostgreSQL database for the Prefect server when PostgreSQL is here (as a lab serving many cells
    runs it); else None: the server's own SQLite."""
    if not reachable(POSTGRES):
        yield None
        return
    psycopg = pytest.importorskip("psycopg")
    name = f"labtwin_prefect_{uuid.uuid4().hex[:8]}"
    base = os.environ.get("LABTWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield base.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_serving_a_campaign_runs_its_jobs_and_its_schedule_through_prefect_deployments(tmp_path, prefect_db):
    (tmp_path / "lab.yaml").write_text(
        yaml.safe_dump(
            {
                "lab": "serve",
                "channels": {
                    "a1": {
                        "driver": "simulated",
                        "cell": "lto_bare_thinfilm",
                        "limits": {"voltage_min_V": 0.1, "voltage_max_V": 3.5},
                    },
                    "a2": {
                        "driver": "simulated",
                        "cell": "lco-lgps-glassy-ceramic",
                        "limits": {"voltage_min_V": 1.9, "voltage_max_V": 3.8},
                    },
                },
            }
        )
    )
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "campaign": "served",
                "lab": str(tmp_path / "lab.yaml"),
                "cells": [
                    {"id": "LTO-1", "channels": ["a1"], "protocols": ["eis-checkup"], "nominal_capacity_Ah": 5.18e-5},
                    {"id": "LCO-1", "channels": ["a2"], "protocols": ["eis-checkup"], "nominal_capacity_Ah": 1.02e-3},
                ],
                "schedule": [{"protocol": "eis-checkup", "cells": ["LTO-1", "LCO-1"], "every": "4s"}],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    db = ["--prefect-db", prefect_db] if prefect_db else []
    done = subprocess.run(
        [
            LABTWIN,
            "campaign",
            "serve",
            str(campaign),
            "--for",
            "15s",
            "--prefect-port",
            str(free_port()),
            *db,
            "--json",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout)
    by_deployment: dict[str, list[dict]] = {}
    for run in served:
        by_deployment.setdefault(run["deployment"], []).append(run)
    # The campaign's own deployment ran once, now; the scheduler made an occurrence per cell every 4 s. One runs
    # at a time per cell: an occurrence due while the previous one still starts or runs is cancelled (a flow-run
    # process takes seconds to start on two cores), never queued, failed or crashed.
    assert [r["state"] for r in by_deployment["served"]] == ["Completed"]
    for cell in ("LTO-1", "LCO-1"):
        runs = by_deployment[f"served-{cell}-eis-checkup"]
        assert len(runs) >= 3, runs
        assert {r["state"] for r in runs} <= {"Completed", "Cancelled"}, runs
        assert [r for r in runs if r["state"] == "Completed"], runs
    # The store has each scheduled occurrence as its own run (its id fixed by the occurrence), all successful.
    store = Store.open(str(tmp_path / "labtwin-data" / "labtwin.db"))
    try:
        runs = store.runs()
    finally:
        store.close()
    scheduled = [r for r in runs if "-s1-eis-checkup-" in r.run_id]
    assert len(scheduled) >= 2 and len({r.run_id for r in scheduled}) == len(scheduled)
    assert {r.exit_status for r in scheduled if r.stopped_at} == {"success"}  # one may still run when serve stops
    assert {r.run_id for r in runs if "-s1-" not in r.run_id} == {
        "served-LTO-1-1-eis-checkup",
        "served-LCO-1-1-eis-checkup",
    }
    status = subprocess.run(
        [LABTWIN, "campaign", "status", str(campaign)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and f"2 finished, {len(scheduled)} scheduled" in status.stdout, status.stdout[-1500:]


async def test_serving_to_a_work_pool_lets_its_workers_run_the_schedule(tmp_path, prefect_db):
    """With a Prefect server configured, `serve --work-pool` only keeps the schedule; a worker (here a
    `prefect worker start` process, as it runs on a lab PC) runs the campaign's jobs and occurrences."""
    from labtwin.orchestration.prefect_server import LocalPrefectServer

    (tmp_path / "lab.yaml").write_text(
        yaml.safe_dump(
            {
                "lab": "pool",
                "channels": {
                    "a1": {
                        "driver": "simulated",
                        "cell": "lco-lgps-glassy-ceramic",
                        "limits": {"voltage_min_V": 1.9, "voltage_max_V": 3.8},
                    },
                },
            }
        )
    )
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        yaml.safe_dump(
            {
                "campaign": "pooled",
                "lab": str(tmp_path / "lab.yaml"),
                "cells": [
                    {"id": "LCO-1", "channels": ["a1"], "protocols": ["eis-checkup"], "nominal_capacity_Ah": 1.02e-3}
                ],
                "schedule": [{"protocol": "eis-checkup", "cells": ["LCO-1"], "every": "4s"}],
            }
        )
    )
    prefect = str(Path(sys.executable).parent / "prefect")
    async with LocalPrefectServer(
        tmp_path / "prefect-server", free_port(), ui=False, database_url=prefect_db
    ) as server:
        env = {**os.environ, "PREFECT_API_URL": server.api_url, "PREFECT_WORKER_QUERY_SECONDS": "2"}
        refused = subprocess.run(
            [LABTWIN, "campaign", "serve", str(campaign), "--work-pool", "lab-pc-1", "--for", "1s"],
            cwd=tmp_path,
            env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0 and "set PREFECT_API_URL" in refused.stderr, refused.stderr
        from prefect.client.orchestration import get_client

        from labtwin.orchestration.campaign_flow import ensure_process_pool

        # The lab PC's worker is up and polling before the schedule starts (a worker takes seconds to start,
        # more on a loaded machine: occurrences due before it polls would be deleted when serve pauses them).
        worker = subprocess.Popen(
            [prefect, "worker", "start", "--pool", "lab-pc-1", "--type", "process"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with get_client() as client:
                for _ in range(240):
                    try:
                        if await client.read_workers_for_work_pool("lab-pc-1"):
                            break
                    except Exception:
                        pass
                    assert worker.poll() is None, "the Prefect worker exited"
                    await asyncio.sleep(0.5)
                else:
                    raise AssertionError("the Prefect worker never polled its pool")
                await ensure_process_pool("made-by-labtwin")  # serve makes a missing pool as a process pool
                assert (await client.read_work_pool("made-by-labtwin")).type == "process"
            serve = await asyncio.to_thread(
                subprocess.run,
                [LABTWIN, "campaign", "serve", str(campaign), "--work-pool", "lab-pc-1", "--for", "20s", "--json"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            out, err = serve.stdout, serve.stderr
        finally:
            worker.terminate()
            worker.wait(30)
    assert serve.returncode == 0, err[-3000:]
    served = json.loads(out)
    states = {(r["deployment"], r["state"]) for r in served}
    assert ("pooled", "Completed") in states
    occurrences = [r for r in served if r["deployment"] == "pooled-LCO-1-eis-checkup"]
    assert len(occurrences) >= 2 and {r["state"] for r in occurrences} <= {"Completed", "Cancelled"}, occurrences
    assert [r for r in occurrences if r["state"] == "Completed"], occurrences
    store = Store.open(str(tmp_path / "labtwin-data" / "labtwin.db"))
    try:
        runs = store.runs()
    finally:
        store.close()
    assert {r.run_id for r in runs if "-s1-" not in r.run_id} == {"pooled-LCO-1-1-eis-checkup"}
    assert [r for r in runs if "-s1-eis-checkup-" in r.run_id] and {r.exit_status for r in runs} == {"success"}
