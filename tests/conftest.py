"""Shared fixtures: real brokers, real databases, a real Prefect API (the test harness)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Prefect keeps its database and settings under PREFECT_HOME (~/.prefect by default): the session gets its own,
# so the suite neither reads nor fills anything outside the repository and its temporary directories.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="labtwin-test-prefect-")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Prefect's migrated database template (labtwin.orchestration.prefect_template, ADR 0019): one per test session,
# built by the first process that needs it and shared by the xdist workers, who inherit the controller's variable.
if "LABTWIN_CACHE_DIR" not in os.environ:
    os.environ["LABTWIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="labtwin-test-cache-")
    atexit.register(shutil.rmtree, os.environ["LABTWIN_CACHE_DIR"], ignore_errors=True)

import socket
import uuid
from pathlib import Path

import pytest

from labtwin.bus import topics
from labtwin.bus.broker import EmbeddedBroker
from tests import leftovers

PREFECT_HOME = os.environ["PREFECT_HOME"]
INTEGRATION = Path(__file__).parent / "integration"
atexit.register(shutil.rmtree, PREFECT_HOME, ignore_errors=True)

MOSQUITTO = ("127.0.0.1", 1883)
POSTGRES = ("127.0.0.1", 5432)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ is slow (Prefect flows, subprocesses, kills, campaigns): `make test-fast`
    leaves them out with ``-m "not slow"``; a slow test elsewhere says so with ``@pytest.mark.slow``."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.slow)


def reachable(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's test harness: a real (temporary) Prefect API for the whole session."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    from labtwin.orchestration.prefect_template import seed_database

    start_uvicorn = SubprocessASGIServer._run_uvicorn_command

    def seeded(server: SubprocessASGIServer):
        # The harness's new database is the migrated template, as labtwin's own local API gets (ADR 0019):
        # a copy in milliseconds instead of Prefect's migrations in each worker.
        url = get_current_settings().server.database.connection_url
        if url is not None:
            seed_database(url.get_secret_value())
        return start_uvicorn(server)

    SubprocessASGIServer._run_uvicorn_command = seeded  # type: ignore[method-assign]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            yield
    finally:
        SubprocessASGIServer._run_uvicorn_command = start_uvicorn  # type: ignore[method-assign]


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


# The lab names this session's tests used on Mosquitto: the session checks nothing is retained under them.
LABS_ON_MOSQUITTO: set[str] = set()


def _lab_prefix(lab: str) -> str:
    return f"{topics.ROOT}/{lab}/#"


def _uses_mosquitto(request: pytest.FixtureRequest) -> bool:
    callspec = getattr(request.node, "callspec", None)
    on_broker_url = callspec is not None and callspec.params.get("broker_url") == "mosquitto"
    return on_broker_url or "mosquitto_url" in request.fixturenames


@pytest.fixture
def unique_lab(request: pytest.FixtureRequest):
    """A lab name per test, so tests on the shared Mosquitto never see each other's retained status; on
    Mosquitto, what the test's agents and twin left retained under the lab is cleared after it (it would
    outlive the test on the broker)."""
    lab = f"test{uuid.uuid4().hex[:8]}"
    on_mosquitto = _uses_mosquitto(request) and reachable(MOSQUITTO)
    if on_mosquitto:
        LABS_ON_MOSQUITTO.add(lab)
    yield lab
    if on_mosquitto:
        left = leftovers.retained_messages(*MOSQUITTO, [_lab_prefix(lab)], quiet_s=0.3)
        leftovers.clear_retained(*MOSQUITTO, left)


@pytest.fixture(autouse=True)
def agent_state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spools, broker sessions and replay state of the agents, recorders and twins a test runs in this process go
    under its tmp_path, not ./labtwin-data of the checkout: a spool a failed test left there was pumped into the
    next session's lab of the same name (a stale RunStart in the signed-lab test)."""
    from labtwin.agent import spool
    from labtwin.bus import sessions

    monkeypatch.setattr(spool, "DEFAULT_SPOOL_DIR", tmp_path / "labtwin-data" / "spool")
    monkeypatch.setattr(sessions, "SESSION_DIR", tmp_path / "labtwin-data" / "sessions")


@pytest.fixture(scope="session", autouse=True)
def leaves_nothing_behind(tmp_path_factory: pytest.TempPathFactory):
    """The session fails if a process it started still runs at its end (a test killed a process whose children,
    such as a Prefect server, live on) or a message stays retained on Mosquitto under a test lab.

    Autouse and session-wide, so it is set up before and torn down after every other fixture (the Prefect test
    harness's own server is stopped by then). A session's processes are this pytest's descendants and, as an
    orphan's parent is PID 1, any process whose command line, working directory or PREFECT_HOME is in the
    session's temporary directories; the ones already running at the start are not the session's."""
    before = leftovers.running_now()
    roots = [Path(PREFECT_HOME), tmp_path_factory.getbasetemp().resolve()]
    checkout_data = Path(__file__).resolve().parents[1] / "labtwin-data"  # a user's demo data: tests keep out
    files_before = _files_under(checkout_data)
    yield
    problems = []
    written = sorted(_files_under(checkout_data) - files_before)
    if written:
        problems.append(
            "the session wrote into the checkout's labtwin-data (a test ran an agent, recorder or twin without its "
            "own working directory or spool_dir):\n  " + "\n  ".join(str(p) for p in written[:20])
        )
    stray = leftovers.started_and_still_running(before, roots)
    if stray:
        problems.append(
            "processes started by the test session still run (killed now):\n  "
            + "\n  ".join(leftovers.describe(p) for p in stray)
        )
        leftovers.kill(stray)
    if LABS_ON_MOSQUITTO and reachable(MOSQUITTO):
        retained = leftovers.retained_messages(*MOSQUITTO, sorted(_lab_prefix(lab) for lab in LABS_ON_MOSQUITTO))
        if retained:
            problems.append(
                "retained messages left on Mosquitto under the test labs (cleared now):\n  "
                + "\n  ".join(sorted(retained))
            )
            leftovers.clear_retained(*MOSQUITTO, retained)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()
