"""The dashboard as a lab meets it: a real run on a simulated LTO cell, watched and paused from headless Chromium.

Real parts throughout: the embedded broker, the channel's agent, the recorder into SQLite, the twin, a Prefect
flow (the test harness), the dashboard served by uvicorn, and Debian's Chromium driven by Playwright.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from labtwin.cli.wiring import LocalLab, default_lab
from labtwin.dashboard.app import DashboardConfig
from labtwin.dashboard.auth import Sessions, add_user, load_users
from labtwin.dashboard.server import DashboardServer
from tests.dashboard.browser import browser_page, need_chromium

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

VIEWER, OPERATOR, PASSWORD = "vera", "otto", "correct horse battery"


async def login(page, base: str, user: str, password: str) -> None:
    await page.goto(base + "login")
    await page.fill("input[name=user]", user)
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")


async def tile_text(page, channel: str, field: str) -> str:
    return await page.inner_text(f'.tile[data-channel="{channel}"] .tile-{field}')


async def wait_tile(page, channel: str, field: str, predicate, timeout_s: float = 60.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        if await page.locator(f'.tile[data-channel="{channel}"] .tile-{field}').count():
            text = await tile_text(page, channel, field)
            if predicate(text):
                return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"tile {channel} {field} never matched; last {text!r}")


async def test_a_run_watched_paused_and_read_back_from_the_browser(tmp_path):
    need_chromium()
    users = tmp_path / "users.json"
    add_user(users, VIEWER, "viewer", PASSWORD)
    add_user(users, OPERATOR, "operator", PASSWORD)
    config = default_lab()
    store_url = f"sqlite:///{tmp_path / 'lab.db'}"
    # 1500 cell seconds per wall second: the 20 h LTO cycle in under a minute, its 2 h onset within seconds.
    async with LocalLab(config, ["ch1"], None, store_url, speed=1500.0, twin=True) as local:
        server = DashboardServer(
            DashboardConfig(broker=local.url, store_url=store_url, port=0, sessions=Sessions(load_users(users)))
        )
        await server.start()
        base = server.url
        from labtwin.orchestration.flows import run_protocol

        flow = asyncio.create_task(run_protocol("demo-lto-0.1C", "ch1", local.url, lab=config.lab))
        try:
            async with browser_page() as page:
                await login(page, base, VIEWER, "wrong password")
                await page.wait_for_selector("#failed", state="visible", timeout=5_000)
                assert "/login" in page.url

                await login(page, base, VIEWER, PASSWORD)
                await page.wait_for_selector('.tile[data-channel="ch1"]', timeout=20_000)
                # Step 1 is the 10 h discharge (24 s here): long enough to watch; the rest before it is not.
                discharge = await wait_tile(page, "ch1", "step", lambda t: t.startswith("1 "), 30)
                assert "discharge" in discharge
                assert await wait_tile(page, "ch1", "cycle", lambda t: t == "1", 10) == "1"
                anomaly = await wait_tile(page, "ch1", "anomaly", lambda t: "oscillation_onset" in t, 90)
                assert "cycle 1" in anomaly
                await page.screenshot(path=str(tmp_path / "lab-viewer.png"), full_page=True)

                # A viewer sees no working pause button, and the API refuses the action outright.
                assert await page.locator('.tile[data-channel="ch1"] button[data-action=pause]').is_disabled()
                me = await page.evaluate("labtwin.me")
                refused = await page.request.post(
                    f"{base}api/channels/{config.lab}/ch1/pause", headers={"X-CSRF-Token": me["csrf"]}
                )
                assert refused.status == 403 and "viewer" in (await refused.json())["error"]

                await page.goto(base + "logout")
                await login(page, base, OPERATOR, PASSWORD)
                await page.wait_for_selector('.tile[data-channel="ch1"] button[data-action=pause]:not([disabled])')
                await page.click('.tile[data-channel="ch1"] button[data-action=pause]')
                t0 = time.monotonic()
                await wait_tile(page, "ch1", "state", lambda t: t.startswith("paused"), 10)
                paused_after_s = time.monotonic() - t0
                await page.screenshot(path=str(tmp_path / "lab-paused.png"), full_page=True)
                await page.click('.tile[data-channel="ch1"] button[data-action=resume]')
                await wait_tile(page, "ch1", "state", lambda t: t.startswith("running"), 10)
                charge = await wait_tile(page, "ch1", "step", lambda t: t.startswith("2 "), 60)  # the tile moves on
                assert "charge" in charge

                summary = await asyncio.wait_for(flow, 240)
                assert summary.exit_status == "success"
                await local.wait_stored(summary.run_id)
                stored = local.store.sample_count(summary.run_id)
                await page.goto(f"{base}run/{summary.run_id}")
                await page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                await page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)
                assert int(await page.get_attribute("#plot-vt", "data-samples")) == stored
                assert int(await page.get_attribute("#plot-vt", "data-points")) > 100
                assert int(await page.get_attribute("#plot-vq", "data-points")) > 100
                assert int(await page.get_attribute("#plot-cap", "data-cycles")) == 1
                assert int(await page.get_attribute("#plot-nyquist", "data-points")) > 10  # the run's EIS step
                fit = await page.inner_text("#eis-fit")  # the twin's circuit for this cell, fitted to the spectrum
                assert "R0-p(R1,CPE1)-CPE2" in fit and "relative RMS" in fit and "R1 = " in fit
                timeline = await page.inner_text("#timeline")
                assert "oscillation_onset" in timeline
                assert f"pause by {OPERATOR} (operator)" in timeline and f"resume by {OPERATOR}" in timeline
                assert page.errors == []  # type: ignore[attr-defined]
        finally:
            if not flow.done():
                flow.cancel()
            await server.stop()
    assert paused_after_s < 1.5
    actions = [(a["action"], a["user_name"], a["outcome"]) for a in local.store.operator_actions()]
    assert actions == [("pause", OPERATOR, "done"), ("resume", OPERATOR, "done")]


async def test_the_dashboard_starts_without_a_broker_and_says_so(tmp_path):
    """A dashboard whose broker is down serves its pages and shows the bus as unreachable (no crash)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    server = DashboardServer(
        DashboardConfig(broker=f"mqtt://127.0.0.1:{dead_port}", store_url=f"sqlite:///{tmp_path / 'x.db'}", port=0)
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            deadline = time.monotonic() + 20
            state = ""
            while time.monotonic() < deadline:
                state = (await client.get("/api/lab")).json()["broker"]["state"]
                if state == "unreachable":
                    break
                await asyncio.sleep(0.2)
            assert state == "unreachable"
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/api/runs")).json() == {"runs": []}
            missing = await client.get("/api/runs/nope")
            assert missing.status_code == 404 and "labtwin runs" in missing.json()["error"]
            bad = await client.get("/api/runs/nope/series?points=5")
            assert bad.status_code == 400 and "points" in bad.json()["error"]
    finally:
        await server.stop()


async def test_the_lab_files_alert_rules_show_on_the_dashboard_once_per_half_cycle(tmp_path, embedded_broker):
    """An onset reported by the twin 5 times in one half cycle is one alert on the dashboard, with its link."""
    from labtwin import bus as busmod
    from labtwin.alerts import AlertsConfig
    from labtwin.bus import Bus
    from labtwin.documents import Anomaly

    alerts = AlertsConfig.model_validate({"rules": [{"when": "anomaly", "kinds": ["oscillation_onset"]}]})
    server = DashboardServer(
        DashboardConfig(
            broker=embedded_broker.url,
            store_url=f"sqlite:///{tmp_path / 'x.db'}",
            port=0,
            alerts=alerts,
            alerts_lab="alertlab",
        )
    )
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            deadline = time.monotonic() + 20
            while (await client.get("/api/lab")).json()["broker"]["state"] != "live":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            async with Bus(embedded_broker.url) as bus:
                for k in range(5):
                    onset = Anomaly(
                        kind="oscillation_onset",
                        cell="lto-1",
                        lab="alertlab",
                        channel="ch1",
                        run_id="r-1",
                        time_s=100.0 + k,
                        cycle=1,
                        step=1,
                        message=f"ripple {k}",
                    )
                    await bus.publish(busmod.cell_topic("alertlab", "lto-1", "anomaly"), onset)
                    # The same from another lab on the shared broker: the lab file's rules are not its rules.
                    other = onset.model_copy(update={"lab": "otherlab", "cell": "lto-2", "run_id": "r-2"})
                    await bus.publish(busmod.cell_topic("otherlab", "lto-2", "anomaly"), other)
                await bus.flush()
            deadline = time.monotonic() + 10
            shown: list = []
            while time.monotonic() < deadline:
                shown = (await client.get("/api/alerts")).json()["alerts"]
                if shown:
                    await asyncio.sleep(0.5)  # the other four had their chance
                    shown = (await client.get("/api/alerts")).json()["alerts"]
                    break
                await asyncio.sleep(0.1)
            assert len(shown) == 1 and shown[0]["cell"] == "lto-1" and shown[0]["kind"] == "oscillation_onset"
            assert shown[0]["link"].endswith("/run/r-1")
            events = (await client.get("/api/lab")).json()["events"]
            assert sum(e["kind"] == "alert" for e in events) == 1
    finally:
        await server.stop()


async def test_the_dashboard_rides_out_a_broker_restart_and_shows_it(tmp_path):
    """Mosquitto killed and started again on its port: the badge says so, and tiles move again afterwards."""
    from labtwin import bus as busmod
    from labtwin.bus import Bus
    from labtwin.documents import ChannelState, ChannelStatus
    from tests.mosquitto_proc import MosquittoProcess

    with MosquittoProcess(tmp_path / "mq") as mosquitto:
        server = DashboardServer(
            DashboardConfig(broker=mosquitto.url, store_url=f"sqlite:///{tmp_path / 'x.db'}", port=0, lab="rlab")
        )
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:

                async def wait_state(wanted: set[str], timeout_s: float) -> str:
                    deadline = time.monotonic() + timeout_s
                    state = ""
                    while time.monotonic() < deadline:
                        state = (await client.get("/api/lab")).json()["broker"]["state"]
                        if state in wanted:
                            return state
                        await asyncio.sleep(0.1)
                    raise AssertionError(f"broker state {state!r}, wanted {wanted}")

                async def publish_status(message: str) -> None:
                    async with Bus(mosquitto.url) as bus:
                        status = ChannelStatus(channel="ch1", state=ChannelState.idle, message=message)
                        await bus.publish(busmod.topic("rlab", "ch1", "status"), status)
                        await bus.flush()

                async def tile_message() -> str:
                    tiles = (await client.get("/api/lab")).json()["tiles"]
                    return tiles[0]["message"] if tiles else ""

                await wait_state({"live"}, 20)
                await publish_status("before")
                deadline = time.monotonic() + 10
                while await tile_message() != "before":
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
                mosquitto.kill()
                assert await wait_state({"reconnecting", "unreachable"}, 30) in {"reconnecting", "unreachable"}
                assert (await client.get("/")).status_code == 200  # pages still served
                mosquitto.start()
                await wait_state({"live"}, 60)
                await publish_status("after")
                deadline = time.monotonic() + 10
                while await tile_message() != "after":
                    assert time.monotonic() < deadline, "tiles did not move after the broker came back"
                    await asyncio.sleep(0.1)
        finally:
            await server.stop()
