"""Headless Debian Chromium for the dashboard's tests, driven by Playwright (never a downloaded browser)."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def chromium_path() -> str | None:
    for candidate in ("chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def need_chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does it)")
    return path


@asynccontextmanager
async def browser_page(width: int = 1300, height: int = 1000):
    """A fresh profile every time (a fresh user-data dir), removed afterwards."""
    from playwright.async_api import async_playwright

    executable = need_chromium()
    profile = tempfile.mkdtemp(prefix="labtwin-chromium-")
    try:
        async with async_playwright() as p:
            context = await p.chromium.launch_persistent_context(
                profile,
                executable_path=executable,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": width, "height": height},
            )
            try:
                page = await context.new_page()
                page.errors = []  # type: ignore[attr-defined]
                page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
                yield page
            finally:
                await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
