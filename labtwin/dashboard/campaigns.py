"""The campaign page's data: every job of a campaign file and where it stands, from the store.

A campaign's jobs have run ids fixed by the plan (labtwin.orchestration.campaign.plan: the same file gives the
same ids), and scheduled runs are named by their entry and time, so the store alone says which jobs are done,
which run now and which wait; no Prefect API is needed (Prefect is used only inside orchestration). With a
Prefect UI given, each run links to its flow run there (the RunStart carries its flow_run_id).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from labtwin.data.store import RunRow, Store
from labtwin.orchestration.campaign import Campaign, interval_s, load_campaign, plan, protocol_stem


def _state(row: RunRow | None) -> str:
    if row is None:
        return "queued"
    return row.exit_status or "running"


def _prefect_link(store: Store, run_id: str, prefect_ui: str | None) -> str | None:
    if not prefect_ui:
        return None
    start, _ = store.run_documents(run_id)
    if start is None or not start.flow_run_id:
        return None
    return f"{prefect_ui.rstrip('/')}/runs/flow-run/{start.flow_run_id}"


def campaign_view(store: Store, campaign: Campaign, prefect_ui: str | None = None) -> dict[str, Any]:
    rows = {r.run_id: r for r in store.runs()}
    jobs = []
    for job in plan(campaign):
        row = rows.get(job.run_id)
        jobs.append(
            {
                "run_id": job.run_id,
                "cell": job.cell.id,
                "channel": job.channel,
                "protocol": protocol_stem(job.protocol),
                "protocol_file": job.protocol,
                "state": _state(row),
                "started": row.started_at if row else None,
                "stopped": row.stopped_at if row else None,
                "samples": row.stored_samples if row else 0,
                "prefect": _prefect_link(store, job.run_id, prefect_ui) if row else None,
            }
        )
    schedule = []
    for n, entry in enumerate(campaign.schedule):
        for cell in entry.cells:
            prefix = f"{campaign.campaign}-{cell}-s{n + 1}-{protocol_stem(entry.protocol)}-"
            done = sorted((r for r in rows.values() if r.run_id.startswith(prefix)), key=lambda r: r.run_id)
            last = done[-1] if done else None
            upcoming: list[str] = []
            if entry.every and last is not None and last.started_at:
                start = datetime.fromisoformat(last.started_at)
                step = timedelta(seconds=interval_s(entry.every))
                upcoming = [(start + step * k).isoformat() for k in (1, 2, 3)]
            schedule.append(
                {
                    "protocol": protocol_stem(entry.protocol),
                    "cell": cell,
                    "timing": f"every {entry.every}" if entry.every else f"cron {entry.cron}",
                    "runs_so_far": len(done),
                    "last_run": last.run_id if last else None,
                    "last_state": _state(last) if last else None,
                    "next": upcoming,
                    "note": "" if upcoming or entry.every is None else "first occurrence when `campaign serve` starts",
                }
            )
    counts: dict[str, int] = {}
    for j in jobs:
        state = str(j["state"])
        counts[state] = counts.get(state, 0) + 1
    return {"campaign": campaign.campaign, "jobs": jobs, "schedule": schedule, "counts": counts}


def load_all(paths: list[Path]) -> list[Campaign]:
    return [load_campaign(p) for p in paths]
