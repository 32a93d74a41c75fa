"""The campaign as a Prefect flow: every job a `run_protocol` flow run, one at a time per channel.

Exclusivity has two layers. In this process jobs wait on a per-channel lock in
priority order (the queue `labtwin campaign status` shows). Across processes
the channel's agent is the lease: it runs one run at a time and says which in
its retained status, so a job waits until the channel is idle (or holds the
job's own interrupted run, which it then resumes). Prefect global concurrency
limits were the first choice and were dropped: on the ephemeral server a slot
held by a killed process was never given back (its 60 s lease was not reaped),
so the campaign that was to resume waited forever. The agent's lease ends
with the run, and a killed flow cannot hold it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from prefect import Flow, flow
from prefect.context import get_run_context
from prefect.exceptions import PrefectHTTPStatusError

from labtwin import bus as busmod
from labtwin.analysis.summary import RunSummary
from labtwin.bus import Bus
from labtwin.data.store import Store
from labtwin.data.store_secret import resolve_password, store_line_of, without_password
from labtwin.documents import ChannelState, ChannelStatus
from labtwin.orchestration.campaign import Campaign, Job, channels_of, interval_s, load_campaign, plan, protocol_stem
from labtwin.orchestration.flows import OFFLINE_GRACE_S, ChannelBusy, run_protocol
from labtwin.orchestration.leash import leash_multiprocessing, leash_spawned_process
from labtwin.orchestration.resume import ResumeState, read_run
from labtwin.security import BrokerConnection, as_identity
from labtwin.security.log_redaction import install_log_redaction
from labtwin.security.redact import redact

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class JobResult:
    run_id: str
    cell: str
    protocol: str
    channel: str
    outcome: str  # "success" | "failed" | "aborted" | "skipped: finished before" | "error: ..."
    resumed: bool = False
    steps_run: int = 0
    reason: str = ""


async def wait_channel_free(
    broker_url: str | BrokerConnection, lab: str, channel: str, own_run: str, timeout_s: float = 7 * 86400
) -> None:
    """Until the channel's agent is idle, or holds this job's own run: the agent is the channel's lease."""
    async with Bus(
        as_identity(broker_url, "orchestrator"),
        f"campaign-wait-{channel}-{own_run[-12:]}-{time.monotonic_ns() % 10**6}",
    ) as bus:
        sub = await bus.subscribe(busmod.topic(lab, channel, "status"))
        deadline = time.monotonic() + timeout_s
        offline_since: float | None = None  # an agent gone offline has the flows' grace to come back
        while time.monotonic() < deadline:
            if offline_since is not None and time.monotonic() - offline_since > OFFLINE_GRACE_S:
                raise ConnectionError(
                    f"channel {channel} is offline: start its agent (`labtwin agent --channel {channel}`)"
                )
            try:
                doc = (await sub.get(min(5.0, deadline - time.monotonic()))).document
            except TimeoutError:
                continue
            if not isinstance(doc, ChannelStatus):
                continue
            if doc.state is ChannelState.offline:
                offline_since = offline_since or time.monotonic()
                continue
            offline_since = None
            if doc.run_id is None or doc.run_id == own_run:
                return
            log.info("campaign: channel %s busy with run %s; %s waits", channel, doc.run_id, own_run)
        raise TimeoutError(f"channel {channel} stayed busy for {timeout_s:.0f} s")


API_ATTEMPTS = 4
START_CONCURRENCY = 8  # flow runs being created at once: 64 at a time locked the ephemeral API's SQLite


#: run id -> how to say that its flow run is running (set by _start_gated, called by the flow's on_running hook).
_ANNOUNCE_RUNNING: dict[str, Callable[[], object]] = {}


def _announce_running(flow: Any, flow_run: Any, state: Any) -> None:
    """run_protocol's on_running hook in a campaign: tells the job that started that run (by its run id)."""
    notify = _ANNOUNCE_RUNNING.get(str((flow_run.parameters or {}).get("run_id")))
    if notify is not None:
        notify()


@functools.cache
def _run_protocol_in_campaign() -> Any:
    """run_protocol with the announcing hook: one flow object for the process. ``with_options`` per job cost
    60 ms each (Prefect regenerates the flow's parameter schema for every copy: 3.8 s for 64 cells)."""
    return run_protocol.with_options(on_running=[_announce_running])


async def _start_gated(gate: asyncio.Semaphore | None, run_id: str, start: Callable[[], Awaitable[T]]) -> T:
    """Run a flow, holding ``gate`` only until its flow run has started: the runs go on in parallel, their
    creation is spread out. The flow's on_running hook says when its run (``run_id``) is running."""
    if gate is None:
        return await start()
    started = asyncio.Event()
    loop = asyncio.get_running_loop()
    # The engine may call hooks from another thread.
    _ANNOUNCE_RUNNING[run_id] = lambda: loop.call_soon_threadsafe(started.set)
    try:
        task = asyncio.ensure_future(start())
        async with gate:
            waiter = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        return await task
    finally:
        _ANNOUNCE_RUNNING.pop(run_id, None)


EPHEMERAL_PARALLEL_RUNS = 64


def default_parallel_runs() -> int:
    """Runs in progress at once: unbounded (one per channel) with a Prefect server; 64 on the local API labtwin
    starts on SQLite. Its SQLite answered 503 to 64 runs' task-run calls while it had a pool of connections
    (16 was the limit then); on one connection (ADR 0019) 64 cells ran 64/64 with no 503 (bench/campaign.py)."""
    import os

    database = (
        os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
        or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")
        or ""
    )
    from labtwin.orchestration.prefect_api import local_api_url

    api_url = os.environ.get("PREFECT_API_URL")
    if (api_url and api_url != local_api_url()) or database.startswith("postgresql"):
        return 1_000_000
    return EPHEMERAL_PARALLEL_RUNS


def _job_flow(
    job: Job, channel: str, broker_url: str | BrokerConnection, lab: str, resume: ResumeState | None
) -> Callable[[], Awaitable[RunSummary]]:
    """How _start_gated starts the job's run_protocol flow run."""

    def start() -> Awaitable[RunSummary]:
        return cast(
            Awaitable[RunSummary],
            _run_protocol_in_campaign()(
                job.protocol,
                channel,
                broker_url,
                lab=lab,
                run_id=job.run_id,
                cell_id=job.cell.id,
                nominal_capacity_Ah=job.cell.nominal_capacity_Ah,
                resume=resume,
            ),
        )

    return start


async def _run_job(
    job: Job,
    campaign: Campaign,
    broker_url: str | BrokerConnection,
    lab: str,
    store: Store,
    locks: dict[str, asyncio.Lock],
    gate: asyncio.Semaphore | None = None,
    running: asyncio.Semaphore | None = None,
) -> JobResult:
    record = read_run(store, job.run_id)
    result = JobResult(job.run_id, job.cell.id, job.protocol, job.channel, "")
    if record.state == "finished":
        result.outcome = f"skipped: finished before ({record.exit_status})"
        return result
    channel = record.resume.channel if record.resume and record.resume.channel else job.channel
    result.channel = channel
    api_failures = 0
    async with locks.setdefault(channel, asyncio.Lock()), running or contextlib.nullcontext():
        try:
            while True:
                await wait_channel_free(broker_url, lab, channel, job.run_id)
                record = read_run(store, job.run_id)  # what the store says now, after waiting our turn
                try:
                    summary = await _start_gated(
                        gate, job.run_id, _job_flow(job, channel, broker_url, lab, record.resume)
                    )
                    break
                except ChannelBusy as exc:  # a run from another process took the channel between our look and our start
                    log.info("campaign %s: %s; job %s waits again", campaign.campaign, exc, job.run_id)
                except PrefectHTTPStatusError as exc:
                    # The Prefect API failed (the ephemeral server's SQLite, locked by many flows at once). The
                    # run's record is in labtwin's store and the agent never repeats a step: try again, resuming.
                    api_failures += 1
                    if api_failures >= API_ATTEMPTS or exc.response.status_code < 500:
                        raise
                    log.warning(
                        "campaign %s: job %s: Prefect API %s; trying again",
                        campaign.campaign,
                        job.run_id,
                        exc.response.status_code,
                    )
                    await asyncio.sleep(5.0 * api_failures)
        except Exception as exc:  # one job's failure does not stop the campaign
            log.exception("campaign %s: job %s failed", campaign.campaign, job.run_id)
            result.outcome = redact(f"error: {type(exc).__name__}: {exc}")  # a flow's result: no secret
            return result
    result.outcome, result.reason = summary.exit_status, summary.reason
    result.resumed, result.steps_run = record.resume is not None, summary.steps_run
    return result


def store_where_it_runs(store_url: str, lab_file: str | None = None, campaign_lab: str | None = None) -> Store:
    """The campaign's store, opened with its password resolved in this process (docs/decisions/0009).

    ``store_url`` is a Prefect parameter, so it comes without a password (``without_password``; one given
    anyway is used, but never put one there: Prefect stores parameters in clear). Here, on the machine that
    runs the flow, the password is the first found of: ``LABTWIN_STORE`` (what an in-process ``campaign
    run`` or ``serve`` hands its flows through its environment), the ``store:`` of the lab file (``lab_file``,
    else ``LABTWIN_LAB``, else the campaign's ``lab:``), each only if it names the same database; else none,
    and psycopg's libpq reads PGPASSWORD, PGPASSFILE or ~/.pgpass natively, as for any URL without one.
    Log redaction is installed first: a flow run started by a Prefect Runner or worker is a process of its own."""
    import os

    install_log_redaction()
    lab_path = lab_file or os.environ.get("LABTWIN_LAB") or campaign_lab
    candidates = (
        ("LABTWIN_STORE", os.environ.get("LABTWIN_STORE")),
        ("the lab file's store:", store_line_of(lab_path) if lab_path else None),
    )
    resolved = resolve_password(store_url, candidates)
    log.info("campaign store %s: password from %s", without_password(store_url), resolved.source)
    try:
        return Store.open(resolved.url)
    except Exception as exc:
        # Prefect stores a failed flow run's exception in its database: it names the URL without the password.
        raise ConnectionError(f"store {without_password(store_url)}: {redact(str(exc))}") from None


# _BY_VALUE: a Prefect Runner hands a deployment's flow to its flow-run process pickled by value (cloudpickle, for
# a module installed editable), and a function pickled by value keeps only the globals its code uses, not the ones
# its annotations name (strings, `from __future__ import annotations`). Without a use of BrokerConnection in the
# body, the flow-run process could not build the parameter model ("`Run_CampaignModel` is not fully defined; you
# should define `BrokerConnection`") and every served run failed before it started.
@flow(name="campaign", flow_run_name="campaign {campaign_file}", log_prints=False)
async def run_campaign(
    campaign_file: str, broker_url: str | BrokerConnection, lab: str, store_url: str, lab_file: str | None = None
) -> list[JobResult]:
    """Run every job of a campaign that has not finished, resuming interrupted ones; returns one result per job.

    ``store_url`` and ``lab_file`` are references: the store's password is resolved here (store_where_it_runs)."""
    leash_spawned_process()  # a Runner's flow-run process ends with the Runner (ADR 0010)
    broker_url = BrokerConnection.parse(broker_url)  # see _BY_VALUE
    campaign = load_campaign(campaign_file)
    jobs = plan(campaign)
    locks = {ch: asyncio.Lock() for ch in channels_of(campaign)}
    store = store_where_it_runs(store_url, lab_file, campaign.lab)
    try:
        gate = asyncio.Semaphore(START_CONCURRENCY)
        running = asyncio.Semaphore(campaign.max_parallel_runs or default_parallel_runs())
        return list(
            await asyncio.gather(
                *(_run_job(job, campaign, broker_url, lab, store, locks, gate, running) for job in jobs)
            )
        )
    finally:
        store.close()


def scheduled_run_id(campaign: Campaign, cell_id: str, entry: int, protocol: str, when) -> str:
    """Fixed by the occurrence: a retry of the same scheduled flow run resumes the same run."""
    return f"{campaign.campaign}-{cell_id}-s{entry + 1}-{protocol_stem(protocol)}-{when:%Y%m%dT%H%M%S}"


@flow(name="campaign-scheduled", flow_run_name="{cell_id}: {protocol} (schedule {entry})", log_prints=False)
async def scheduled_job(
    campaign_file: str,
    cell_id: str,
    protocol: str,
    entry: int,
    broker_url: str | BrokerConnection,
    lab: str,
    store_url: str,
    lab_file: str | None = None,
) -> JobResult:
    """One occurrence of a campaign's schedule on one cell: waits its turn on the cell's channel like any job.

    ``store_url`` comes without its password, resolved here like run_campaign's."""
    leash_spawned_process()  # a Runner's flow-run process ends with the Runner (ADR 0010)
    broker_url = BrokerConnection.parse(broker_url)  # see _BY_VALUE
    campaign = load_campaign(campaign_file)
    cell = next(c for c in campaign.cells if c.id == cell_id)
    try:
        flow_run = getattr(get_run_context(), "flow_run", None)
        when = flow_run.expected_start_time if flow_run is not None else None
    except Exception:  # pragma: no cover - called outside a flow run
        when = None
    when = when or datetime.now(UTC)
    run_id = scheduled_run_id(campaign, cell_id, entry, protocol, when)
    store = store_where_it_runs(store_url, lab_file, campaign.lab)
    try:
        channel = await first_free_channel(broker_url, lab, cell.channels, run_id)
        job = Job(run_id, cell, protocol, channel, order=0)
        result = await _run_job(job, campaign, broker_url, lab, store, {})
    finally:
        store.close()
    if result.outcome not in ("success",) and not result.outcome.startswith("skipped"):
        raise RuntimeError(f"scheduled run {run_id}: {result.outcome} {result.reason}".strip())
    return result


async def first_free_channel(broker_url: str | BrokerConnection, lab: str, channels: list[str], own_run: str) -> str:
    """The first channel of a pool whose agent is idle (or holds this run) now; else the first of the pool,
    where the job will wait its turn."""
    if len(channels) == 1:
        return channels[0]
    async with Bus(
        as_identity(broker_url, "orchestrator"), f"campaign-pool-{own_run[-12:]}-{time.monotonic_ns() % 10**6}"
    ) as bus:
        sub = await bus.subscribe([busmod.topic(lab, ch, "status") for ch in channels])
        seen: dict[str, ChannelStatus] = {}
        deadline = time.monotonic() + 5.0
        while len(seen) < len(channels) and time.monotonic() < deadline:
            try:
                doc = (await sub.get(deadline - time.monotonic())).document
            except TimeoutError:
                break
            if isinstance(doc, ChannelStatus):
                seen[doc.channel] = doc
    for ch in channels:
        status = seen.get(ch)
        if status is not None and status.state is not ChannelState.offline and status.run_id in (None, own_run):
            return ch
    return channels[0]


@dataclass
class ServedRun:
    """A flow run the campaign's deployments made, as the Prefect API reports it."""

    deployment: str
    flow_run: str
    state: str
    expected_start: str


DRAIN_TIMEOUT_S = 120.0


async def serve_campaign(
    campaign_file: str,
    broker_url: str | BrokerConnection,
    lab: str,
    store_url: str,
    run_now: bool = True,
    duration_s: float | None = None,
    ready: asyncio.Event | None = None,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
    work_pool: str | None = None,
    lab_file: str | None = None,
) -> list[ServedRun]:
    """Serve the campaign through Prefect deployments: its jobs (run once now) and each schedule entry per cell.

    Without a work pool, Prefect's Runner (what flow.serve uses) in this process polls the API for the
    deployments' due flow runs and runs each in a subprocess. With ``work_pool``, the deployments go to that
    Prefect work pool (a process pool, made if missing) and the pool's workers run them, on whichever PCs
    run `prefect worker start --pool NAME`; this process only keeps the schedule. Either way the API
    server's scheduler makes the runs from the interval or cron, so a Prefect server is needed
    (PREFECT_API_URL): the ephemeral in-process API has no scheduler.

    A schedule entry runs at most one occurrence per cell at a time: an occurrence due while the previous
    one still runs (or waits for the channel) is cancelled, not queued behind it, so a slow channel never
    piles up check-ups (nor flow-run processes on the lab PC). Stopping (after ``duration_s``, or when
    cancelled) pauses the deployments, which deletes their future occurrences, and lets the runs in progress
    finish for up to ``drain_timeout_s``; the Runner then cancels the rest (their run ids are fixed, so a
    later run of the same occurrence resumes them), a pool's workers carry on with theirs. Returns every
    flow run the deployments made, from the API.

    The deployments' parameters are stored by the Prefect server: ``store_url`` goes there without its
    password (a password given is dropped here) and each flow run resolves it where it runs: a Runner's flow
    runs inherit this process's environment (``LABTWIN_STORE``); a pool's workers need it in theirs, in the
    lab file ``lab_file`` names on their machine, or in libpq's PGPASSWORD / ~/.pgpass."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments import arun_deployment
    from prefect.flows import EntrypointType
    from prefect.runner import Runner

    campaign = load_campaign(campaign_file)
    params = {
        "campaign_file": str(Path(campaign_file).resolve()),
        "broker_url": broker_url,
        "lab": lab,
        "store_url": without_password(store_url),
        "lab_file": lab_file,
    }
    module = EntrypointType.MODULE_PATH  # the package is installed: no dependence on the working directory
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    wanted: list[tuple[Flow[..., Any], dict[str, Any]]] = [
        (run_campaign, dict(name=campaign.campaign, parameters=params, tags=["labtwin", campaign.campaign]))
    ]
    for k, entry in enumerate(campaign.schedule):
        timing: dict[str, Any] = {"interval": interval_s(entry.every)} if entry.every else {"cron": entry.cron}
        for cell_id in entry.cells:
            wanted.append(
                (
                    scheduled_job,
                    dict(
                        name=f"{campaign.campaign}-{cell_id}-{protocol_stem(entry.protocol)}",
                        **timing,
                        parameters={**params, "cell_id": cell_id, "protocol": entry.protocol, "entry": k},
                        tags=["labtwin", campaign.campaign, "scheduled"],
                        concurrency_limit=one_at_a_time,
                    ),
                )
            )
    runner = None
    if work_pool is None:
        # The Runner looks for due runs every 10 s by default; a schedule every few seconds would wait most of
        # its interval, so it looks at least twice per shortest interval (cron schedules are minutes apart).
        intervals = [interval_s(e.every) for e in campaign.schedule if e.every]
        poll_s = max(1.0, min([10.0, *(i / 2 for i in intervals)]))
        leash_multiprocessing()  # its flow-run processes end with this one from their first instruction (ADR 0010)
        runner = Runner(name=f"labtwin-{campaign.campaign}", limit=None, pause_on_shutdown=True, query_seconds=poll_s)
        deployment_ids = [await runner.aadd_flow(f, **kw, entrypoint_type=module) for f, kw in wanted]
    else:
        await ensure_process_pool(work_pool)
        deployment_ids = []
        for f, kw in wanted:
            deployment = await f.ato_deployment(**kw, entrypoint_type=module, work_pool_name=work_pool)
            deployment_ids.append(await deployment.aapply(work_pool_name=work_pool))
    only_ours = DeploymentFilter(id=DeploymentFilterId(any_=deployment_ids))
    if run_now:
        await arun_deployment(f"campaign/{campaign.campaign}", timeout=0, as_subflow=False)
    # Without a Runner, this process only waits: the pool's workers run the flow runs.
    serving = asyncio.create_task(runner.start() if runner is not None else asyncio.Event().wait())
    if ready is not None:
        ready.set()
    try:
        if duration_s is None:
            await serving
        else:
            done, _ = await asyncio.wait([serving], timeout=duration_s)
            if serving in done:
                serving.result()
    finally:
        if not serving.done():
            async with get_client() as client:
                for deployment_id in deployment_ids:  # no new occurrences from here on
                    with contextlib.suppress(Exception):
                        await client.pause_deployment(deployment_id)
                await _drain(client, only_ours, drain_timeout_s)
            if runner is None:
                serving.cancel()
            else:
                with contextlib.suppress(Exception):
                    await runner.astop()  # cancels what is still running after the drain
                try:
                    await asyncio.wait_for(serving, 30)
                except (TimeoutError, asyncio.CancelledError):
                    serving.cancel()
    async with get_client() as client:
        deployments = {d.id: d.name for d in await client.read_deployments(deployment_filter=only_ours)}
        runs = await client.read_flow_runs(deployment_filter=only_ours)
    return sorted(
        (
            ServedRun(
                deployments.get(r.deployment_id, "?") if r.deployment_id is not None else "?",
                r.name or "",
                r.state.name if r.state and r.state.name else "?",
                f"{r.expected_start_time:%Y-%m-%d %H:%M:%S}" if r.expected_start_time else "",
            )
            for r in runs
        ),
        key=lambda r: r.expected_start,
    )


async def ensure_process_pool(name: str) -> None:
    """The work pool the campaign's deployments go to: made as a process pool (what `prefect work-pool create
    NAME --type process` makes) when the server has none of that name; an existing pool is used as it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    description="labtwin campaigns: run `prefect worker start --pool NAME` where labtwin is installed",
                )
            )


async def _drain(client, only_ours, timeout_s: float) -> None:
    """Until no flow run of the deployments is pending or running (or the time is up)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    in_progress = FlowRunFilter(
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING])
        )
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not await client.read_flow_runs(deployment_filter=only_ours, flow_run_filter=in_progress, limit=1):
                return
        except Exception:  # the API busy: look again
            pass
        await asyncio.sleep(1.0)
    log.warning("campaign serve: runs still in progress after %.0f s of draining", timeout_s)
