"""The campaigns page: a campaign run for real (Prefect harness, agent, recorder), then shown job by job."""

from __future__ import annotations

import pytest
import yaml

from labtwin.cli.wiring import LocalLab
from labtwin.dashboard.app import DashboardConfig
from labtwin.dashboard.server import DashboardServer
from labtwin.orchestration.campaign import load_campaign
from tests.dashboard.browser import browser_page, need_chromium
from tests.helpers import sim_lab

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

SHORT = """
metadata: {name: short cycle, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 30}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 60}
  - Discharge at 2C until 1.2 V
  - Charge at 2C until 2.5 V
"""


def _campaign(tmp_path, name: str, protocols: list[str], schedule: bool) -> str:
    path = tmp_path / f"{name}.yaml"
    doc: dict = {
        "campaign": "dash",
        "cells": [{"id": "LTO-9", "channels": ["c1"], "protocols": protocols, "nominal_capacity_Ah": 5.18e-5}],
    }
    if schedule:
        doc["schedule"] = [{"protocol": protocols[0], "cells": ["LTO-9"], "every": "1d"}]
    path.write_text(yaml.safe_dump(doc))
    return str(path)


async def test_the_campaigns_page_shows_done_and_queued_jobs_with_their_prefect_runs(tmp_path, unique_lab):
    need_chromium()
    from labtwin.bus.broker import EmbeddedBroker
    from labtwin.orchestration.campaign_flow import run_campaign

    (tmp_path / "short.yaml").write_text(SHORT)
    (tmp_path / "later.yaml").write_text(SHORT.replace("short cycle", "later cycle"))
    first = _campaign(tmp_path, "first", [str(tmp_path / "short.yaml")], schedule=False)
    whole = _campaign(tmp_path, "whole", [str(tmp_path / "short.yaml"), str(tmp_path / "later.yaml")], schedule=True)
    store_url = f"sqlite:///{tmp_path / 'c.db'}"
    lab = sim_lab(unique_lab, {"c1": "lto_bare_thinfilm"}, speed="max")
    async with EmbeddedBroker() as broker, LocalLab(lab, ["c1"], broker.url, store_url) as local:
        results = await run_campaign(first, local.url, unique_lab, store_url)
        assert [r.outcome for r in results] == ["success"], results
        await local.wait_stored("dash-LTO-9-1-short")
        server = DashboardServer(
            DashboardConfig(
                broker=local.url,
                store_url=store_url,
                port=0,
                campaigns=[load_campaign(whole)],
                prefect_ui_url="http://prefect.lab.example:4200",
            )
        )
        await server.start()
        try:
            async with browser_page() as page:
                await page.goto(server.url + "campaigns")
                await page.wait_for_selector("tr.job", timeout=20_000)
                states = await page.eval_on_selector_all("tr.job", "rows => rows.map(r => r.dataset.state)")
                assert states == ["success", "queued"]
                heading = await page.inner_text("h2")
                assert "1 success" in heading and "1 queued" in heading
                link = await page.get_attribute("tr.job.success a[href*='flow-run']", "href")
                start, _ = local.store.run_documents("dash-LTO-9-1-short")
                assert start is not None and start.flow_run_id and link.endswith(f"/runs/flow-run/{start.flow_run_id}")
                assert await page.get_attribute("tr.job.success a", "href") == "/run/dash-LTO-9-1-short"
                schedule = await page.inner_text("main")
                assert "every 1d" in schedule and "first occurrence when `campaign serve` starts" in schedule
                await page.screenshot(path=str(tmp_path / "campaigns.png"), full_page=True)
                assert page.errors == []  # type: ignore[attr-defined]
        finally:
            await server.stop()
