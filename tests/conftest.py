"""Shared fixtures: real brokers, real databases, a real Prefect API (the test harness)."""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import socket
import uuid

import pytest

from labtwin.bus.broker import EmbeddedBroker

MOSQUITTO = ("127.0.0.1", 1883)
POSTGRES = ("127.0.0.1", 5432)


def reachable(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness: a real (temporary) Prefect API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
async def embedded_broker():
    async with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture
def mosquitto_url():
    if not reachable(MOSQUITTO):
        pytest.skip("no Mosquitto at 127.0.0.1:1883 (start it with `mosquitto -d`)")
    return "mqtt://127.0.0.1:1883"


@pytest.fixture(params=["embedded", "mosquitto"])
async def broker_url(request):
    """Every bus test runs on the embedded broker and, when present, on Mosquitto."""
    if request.param == "embedded":
        async with EmbeddedBroker() as broker:
            yield broker.url
    else:
        if not reachable(MOSQUITTO):
            pytest.skip("no Mosquitto at 127.0.0.1:1883 (start it with `mosquitto -d`)")
        yield "mqtt://127.0.0.1:1883"


@pytest.fixture
def postgres_url():
    """A fresh schema in the PostgreSQL at 127.0.0.1:5432, dropped afterwards."""
    if not reachable(POSTGRES):
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    psycopg = pytest.importorskip("psycopg")
    schema = f"labtwin_test_{uuid.uuid4().hex[:8]}"
    base = os.environ.get("LABTWIN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def unique_lab() -> str:
    """A lab name per test, so tests on the shared Mosquitto never see each other's retained status."""
    return f"test{uuid.uuid4().hex[:8]}"
