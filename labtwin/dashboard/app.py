"""The dashboard's web app (Starlette): pages, JSON for the plots, a live stream, and operator actions.

Starlette because it is already installed with Prefect and is all a handful of routes need; uvicorn serves it.
The pages are static HTML and one script (labtwin/dashboard/static), drawn with uPlot, shipped in the
package: a lab network may have no internet. Live updates go to the browser as server-sent events: one-way,
plain HTTP, reconnected by the browser on its own, which is what a view of a bus needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from labtwin.alerts import Alert, AlertFeed, AlertsConfig, AlertService
from labtwin.bus.operator import ORDERS, CommandFailed, command_channel
from labtwin.dashboard import history
from labtwin.dashboard.auth import Session, Sessions
from labtwin.dashboard.campaigns import campaign_view
from labtwin.dashboard.live import LiveLab
from labtwin.data.export import FORMATS, export_samples
from labtwin.data.store import Store
from labtwin.orchestration.campaign import Campaign
from labtwin.security import BrokerConnection
from labtwin.security.connection import is_loopback

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "labtwin_session"
SSE_TICK_S = 0.1  # updates are coalesced for this long: a tile changes at most ten times a second
SSE_PING_S = 10.0


@dataclass
class DashboardConfig:
    broker: str | BrokerConnection
    store_url: str | None
    lab: str = "+"
    host: str = "127.0.0.1"
    port: int = 8050
    tls: bool = False
    sessions: Sessions | None = None
    prefect_ui_url: str | None = None
    alerts: AlertsConfig | None = None  # the lab file's alerts: shown on the pages (and sent with send_alerts)
    alerts_lab: str | None = None
    alerts_cells: dict[str, str] = field(default_factory=dict)  # channel -> cell id, from the lab file
    send_alerts: bool = False
    campaigns: list[Campaign] = field(default_factory=list)  # campaign files shown on /campaigns

    @property
    def actions_allowed_here(self) -> bool:
        """Operator actions need TLS when the dashboard is reachable beyond this machine."""
        return self.tls or is_loopback(self.host)


class StoreUnavailable(Exception):
    """The store could not be opened (down, wrong URL, a schema this labtwin cannot read): 503, with why."""


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _float(value: str | None, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"query parameter {name}={value!r}: not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"query parameter {name}={value!r}: must be finite")
    return number


async def _serve_alerts(service: AlertService, stop: asyncio.Event) -> None:
    """The alert service for as long as the dashboard runs, through broker outages."""
    while not stop.is_set():
        try:
            await service.serve(stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("dashboard: alerts: %s: %s; retrying", type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 2.0)


def create_app(config: DashboardConfig) -> Starlette:
    sessions = config.sessions or Sessions(None)
    live = LiveLab(config.broker, config.lab)
    feed = AlertFeed()
    alert_service: AlertService | None = None
    if config.alerts is not None and config.alerts_lab:
        # Shown here always; sent from here only with send_alerts (else `labtwin alerts watch` sends them).
        alert_service = AlertService(
            config.broker,
            config.alerts,
            config.alerts_lab,
            cells_by_channel=config.alerts_cells,
            feed=feed,
            senders=None if config.send_alerts else {},
        )

    def show_alert(alert: Alert) -> None:
        live.note(
            alert.lab, alert.run_id or None, None, "alert", f"ALERT {alert.kind} on {alert.cell}: {alert.message}"
        )

    feed.subscribe(show_alert)
    state: dict[str, Any] = {"store": None, "store_error": ""}
    columns = history.SampleCache()

    opening = threading.Lock()  # requests come in worker threads: the store is opened once

    def store() -> Store:
        with opening:
            return _open_once()

    def _open_once() -> Store:
        if state["store"] is None:
            try:
                state["store"] = Store.open(config.store_url)
                state["store_error"] = ""
            except Exception as exc:
                state["store_error"] = f"{type(exc).__name__}: {exc}"
                raise StoreUnavailable(f"the store cannot be opened: {exc}") from None
        return state["store"]

    async def in_store(fn, *args, **kwargs) -> Any:
        """A store read in a worker thread: a busy database delays its page, never the live stream."""
        return await asyncio.to_thread(lambda: fn(store(), *args, **kwargs))

    # Started and stopped by DashboardServer, not through ASGI lifespan: uvicorn keeps its lifespan task only in
    # a local variable, so a garbage collection under load closed it mid-run (seen with a busy broker) and took
    # the live subscription down with it.
    stop_alerts = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        def warm() -> None:
            history.warm_imports()
            store()  # opened (and its schema checked) before the first page asks

        warming = asyncio.get_running_loop().run_in_executor(None, warm)
        warming.add_done_callback(lambda f: f.exception())  # an error surfaces in the request that meets it
        if alert_service is not None and config.send_alerts:
            tasks.append(asyncio.create_task(_serve_alerts(alert_service, stop_alerts)))
        elif alert_service is not None:
            service = alert_service

            def rules(lab: str, doc: BaseModel) -> None:
                if lab == service.lab:  # the lab file's rules are its lab's: other labs on the broker are not
                    service.take(doc)

            live.on_document = rules
        await live.start()

    async def stop() -> None:
        await live.stop()
        stop_alerts.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
        if state["store"] is not None:
            state["store"].close()
            state["store"] = None

    def session_of(request: Request) -> Session | None:
        if not sessions.logins_required:
            return sessions.anonymous()
        return sessions.get(request.cookies.get(COOKIE))

    def page(name: str):
        async def handler(request: Request) -> Response:
            if session_of(request) is None:
                return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

        return handler

    def api(fn):
        async def handler(request: Request) -> Response:
            who = session_of(request)
            if who is None:
                return _error(401, "log in first: /login")
            try:
                return await fn(request, who)
            except StoreUnavailable as exc:
                return _error(503, str(exc))
            except KeyError as exc:
                return _error(404, str(exc.args[0]) if exc.args else "not found")
            except ValueError as exc:
                return _error(400, str(exc))
            except (SQLAlchemyError, OSError) as exc:
                log.error("dashboard: %s: store: %s: %s", request.url.path, type(exc).__name__, exc)
                return _error(503, f"the store is not answering ({type(exc).__name__}); try again")
            except Exception as exc:
                log.exception("dashboard: %s failed", request.url.path)
                return _error(500, f"{type(exc).__name__}: {exc}")

        return handler

    serve_run_page = page("run.html")

    async def run_page(request: Request) -> Response:
        """The run page, and the read of the run's columns begun while the browser loads its scripts: the
        series and cycles the page asks for next wait on that one read (SampleCache) instead of starting it."""
        response = await serve_run_page(request)
        if response.status_code == 200:
            run_id = request.path_params["run_id"]
            reading = asyncio.get_running_loop().run_in_executor(None, lambda: columns.samples(store(), run_id))
            reading.add_done_callback(lambda f: f.exception())  # an unknown run or a busy store: its API says
        return response

    async def login_page(request: Request) -> Response:
        return FileResponse(STATIC / "login.html", headers={"Cache-Control": "no-store"})

    async def login(request: Request) -> Response:
        # The login form is three urlencoded fields: parsed here (python-multipart is not needed for that).
        body = await request.body()
        if len(body) > 4096:
            return _error(413, "login form too large")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        name, password = form.get("user", ""), form.get("password", "")
        nxt = form.get("next", "/")
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        found = await asyncio.to_thread(sessions.login, name, password) if sessions.logins_required else None
        if found is None:
            await asyncio.sleep(0.5)  # a guess costs time
            return RedirectResponse("/login?failed=1", status_code=303)
        token, _ = found
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=config.tls, path="/")
        return response

    async def logout(request: Request) -> Response:
        sessions.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def whoami(request: Request, who: Session) -> Response:
        return _json(
            {
                "user": who.user,
                "role": who.role,
                "csrf": who.csrf,
                "logins_required": sessions.logins_required,
                "actions_allowed": who.role == "operator" and config.actions_allowed_here,
                "prefect_ui_url": config.prefect_ui_url,
            }
        )

    async def lab_state(request: Request, who: Session) -> Response:
        snap = live.lab_snapshot(request.query_params.get("lab") or None)
        snap["store"] = {"state": "error" if state["store_error"] else "ok", "detail": state["store_error"]}
        return _json(snap)

    async def alerts(request: Request, who: Session) -> Response:
        q = request.query_params
        recent = feed.recent(lab=q.get("lab") or None, run_id=q.get("run") or None)
        return _json({"alerts": [a.model_dump(mode="json") for a in recent[-200:]]})

    async def campaigns(request: Request, who: Session) -> Response:
        views = [await in_store(campaign_view, c, config.prefect_ui_url) for c in config.campaigns]
        return _json({"campaigns": views, "prefect_ui_url": config.prefect_ui_url})

    async def runs(request: Request, who: Session) -> Response:
        return _json({"runs": await in_store(history.run_rows)})

    async def run_meta(request: Request, who: Session) -> Response:
        run_id = await in_store(lambda s, p: s.find_run(p), request.path_params["run_id"])
        meta = await in_store(history.run_meta, run_id)
        meta["actions"] = await in_store(lambda s: s.operator_actions(run_id=run_id))
        meta["live"] = run_id in live.points
        return _json(meta)

    async def run_series(request: Request, who: Session) -> Response:
        q = request.query_params
        points = int(q.get("points", history.SERIES_POINTS))
        if not 10 <= points <= 100_000:
            raise ValueError("query parameter points: use 10 to 100000")
        data = await in_store(
            history.series,
            request.path_params["run_id"],
            points,
            _float(q.get("from"), "from"),
            _float(q.get("to"), "to"),
            cache=columns,
        )
        return _json(data)

    async def run_cycles(request: Request, who: Session) -> Response:
        return _json(await in_store(history.cycles, request.path_params["run_id"], cache=columns))

    async def run_timeline(request: Request, who: Session) -> Response:
        run_id = request.path_params["run_id"]
        data = await in_store(history.timeline, run_id)
        data["actions"] = await in_store(lambda s: s.operator_actions(run_id=run_id))
        return _json(data)

    async def run_impedance(request: Request, who: Session) -> Response:
        circuit = request.query_params.get("circuit") or None
        if circuit is not None and len(circuit) > 200:
            raise ValueError("query parameter circuit: at most 200 characters")
        return _json(await in_store(history.impedance, request.path_params["run_id"], circuit))

    async def run_export(request: Request, who: Session) -> Response:
        fmt = request.path_params["fmt"]
        if fmt not in FORMATS:
            raise ValueError(f"export format {fmt!r}: use one of {', '.join(FORMATS)}")
        run_id = request.path_params["run_id"]
        suffix = {"csv": ".csv", "parquet": ".parquet", "bdf": ".bdf"}[fmt]
        folder = Path(tempfile.mkdtemp(prefix="labtwin-export-"))
        path = folder / f"{run_id}{suffix}"

        def write(s: Store) -> None:
            start, _ = s.run_documents(run_id)
            export_samples(s.samples(run_id), path, fmt, start.time.timestamp() if start else None)

        await in_store(write)

        def cleanup() -> None:
            with contextlib.suppress(OSError):
                path.unlink()
                folder.rmdir()

        return FileResponse(path, filename=path.name, background=BackgroundTask(cleanup))

    async def events(request: Request, who: Session) -> Response:
        listener = live.listen(
            run_id=request.query_params.get("run") or None, lab=request.query_params.get("lab") or None
        )

        async def stream() -> AsyncIterator[bytes]:
            try:
                snap = live.lab_snapshot(listener.lab)
                yield f"event: snapshot\ndata: {json.dumps(snap)}\n\n".encode()
                while True:
                    try:
                        first = await asyncio.wait_for(listener.queue.get(), SSE_PING_S)
                    except TimeoutError:
                        yield b": ping\n\n"
                        continue
                    await asyncio.sleep(SSE_TICK_S)
                    batch = [first]
                    while not listener.queue.empty():
                        batch.append(listener.queue.get_nowait())
                    tiles: dict[str, Any] = {}
                    others: list[dict[str, Any]] = []
                    points: dict[str, list[Any]] = {"time_s": [], "voltage_V": [], "current_A": []}
                    for update in batch:
                        if update["kind"] == "tile":
                            t = update["tile"]
                            tiles[f"{t['lab']}/{t['channel']}"] = t
                        elif update["kind"] == "points":
                            for k in points:
                                points[k].extend(update[k])
                        else:
                            others.append(update)
                    out = {"tiles": list(tiles.values()), "updates": others, "sent_ms": time.time() * 1e3}
                    if points["time_s"]:
                        out["points"] = points
                    yield f"event: update\ndata: {json.dumps(out, allow_nan=False, default=str)}\n\n".encode()
            finally:
                live.forget(listener)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    async def action(request: Request, who: Session) -> Response:
        lab, channel, verb = (request.path_params[k] for k in ("lab", "channel", "action"))
        if verb not in ORDERS:
            return _error(404, f"action {verb!r}: use pause, resume or stop")
        if who.role != "operator":
            return _error(403, f"user {who.user!r} is a {who.role}: only an operator login may {verb} a run")
        if not config.actions_allowed_here:
            return _error(
                403,
                "operator actions need TLS when the dashboard listens beyond loopback: start it with --tls-cert/--tls-key",
            )
        if not who.csrf or request.headers.get("x-csrf-token") != who.csrf:
            return _error(403, "missing or wrong CSRF token: reload the page")
        origin = request.headers.get("origin")
        if origin is not None and origin.rstrip("/") != f"{request.url.scheme}://{request.url.netloc}":
            return _error(403, f"request from another origin ({origin}) refused")
        body = await request.json() if request.headers.get("content-type", "").startswith("application/json") else {}
        reason = str(body.get("reason") or f"{verb} by {who.user} (dashboard)")[:200]
        tile = live.tiles.get((lab, channel))
        run_id = tile.run_id if tile else None
        done_run: str | None
        try:
            done_run = await command_channel(config.broker, lab, channel, ORDERS[verb](reason))
            outcome, detail, status = "done", "", 200
        except CommandFailed as exc:
            outcome, detail, status = ("refused" if exc.refused else "failed"), str(exc), 409
            done_run = run_id
        except Exception as exc:
            outcome, detail, status = "failed", f"{type(exc).__name__}: {exc}", 503
            done_run = run_id
        live.note(
            lab,
            done_run,
            tile.cell_time_s if tile else None,
            "action",
            f"{channel}: {verb} by {who.user} ({who.role}): {outcome}" + (f": {detail}" if detail else ""),
        )
        try:
            await in_store(
                lambda s: s.record_action(
                    lab=lab,
                    channel=channel,
                    action=verb,
                    user_name=who.user,
                    role=who.role,
                    outcome=outcome,
                    run_id=done_run,
                    time_s=tile.cell_time_s if tile else None,
                    detail=detail,
                )
            )
        except Exception as exc:
            log.error("dashboard: %s of %s by %s not recorded: %s", verb, channel, who.user, exc)
        return _json(
            {"action": verb, "channel": channel, "run_id": done_run, "outcome": outcome, "detail": detail}, status
        )

    routes = [
        Route("/", page("lab.html")),
        Route("/run/{run_id}", run_page),
        Route("/runs", page("runs.html")),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST", "GET"]),
        Route("/api/whoami", api(whoami)),
        Route("/api/lab", api(lab_state)),
        Route("/api/events", api(events)),
        Route("/api/alerts", api(alerts)),
        Route("/campaigns", page("campaigns.html")),
        Route("/api/campaigns", api(campaigns)),
        Route("/api/runs", api(runs)),
        Route("/api/runs/{run_id}", api(run_meta)),
        Route("/api/runs/{run_id}/series", api(run_series)),
        Route("/api/runs/{run_id}/cycles", api(run_cycles)),
        Route("/api/runs/{run_id}/timeline", api(run_timeline)),
        Route("/api/runs/{run_id}/impedance", api(run_impedance)),
        Route("/api/runs/{run_id}/export.{fmt}", api(run_export)),
        Route("/api/channels/{lab}/{channel}/{action}", api(action), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.start = start
    app.state.stop = stop
    app.state.live = live
    app.state.alerts = feed
    app.state.config = config
    return app
