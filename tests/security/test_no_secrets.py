"""No secret in any output, log, audit file, Prefect parameter or Prefect's database (issue 13).

Real parts: `labtwin broker` (the embedded broker, which takes any password on loopback) in a process of its
own; `labtwin agent`, `record`, `twin`, `run` and `campaign run` as subprocesses with a broker URL and a
PostgreSQL URL that carry passwords; the session's Prefect API (its SQLite database is grepped); the
PostgreSQL at 127.0.0.1:5432 (trust auth: any password is accepted, so a run that succeeded does not by
itself show the password was resolved; ``test_the_flow_resolves_the_store_password_where_it_runs`` does).
After each, every file written under the test's temporary directories and Prefect's database are read as
bytes: the password is nowhere.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labtwin.cli import app
from tests.conftest import POSTGRES, reachable
from tests.helpers import kill_process_group

BROKER_PW = "S3cretPw"
STORE_PW = "PgS3cretPw"
LABTWIN = [sys.executable, "-c", "from labtwin.cli import main; main()"]
PROTOCOL = """
metadata: {name: short, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -1.0, until: {time_s: 600}}
  - rest: {duration_s: 60}
"""
runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith(("LABTWIN_", "PGPASS")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT (what Ctrl-C sends: the component stops safely), then SIGKILL of its process group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill_process_group(proc.pid)
            proc.wait(5)


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [*LABTWIN, *args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"{what} exited: {log.read_text(errors='replace')}"
        assert time.monotonic() < deadline, f"{what} not ready in {timeout_s} s: {log.read_text(errors='replace')}"
        time.sleep(0.2)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def broker_port(tmp_path) -> Iterator[int]:
    """`labtwin broker --port` in a process of its own."""
    port = _free_port()
    log = tmp_path / "broker.log"
    proc = _start(["broker", "--port", str(port)], log)
    try:
        _wait_for("labtwin broker", lambda: _listening(port), proc, log)
        yield port
    finally:
        _stop(proc)


def _lab_file(tmp_path: Path, lab: str, store: str | None = None) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(
        f"lab: {lab}\n"
        + (f"store: '{store}'\n" if store else "")
        + "channels:\n  ch1: {driver: simulated, cell: lto_bare_thinfilm, speed: max, seed: 1, "
        "limits: {voltage_min_V: 0.1, voltage_max_V: 4.0}}\n",
        encoding="utf-8",
    )
    return path


def _prefect_env() -> dict[str, str]:
    """The subprocess talks to the session's Prefect API (tests/conftest.py prefect_api): no server of its own."""
    from prefect.settings import PREFECT_API_URL

    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LABTWIN_")},
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "COLUMNS": "200",  # rich wraps a line at the terminal's width, 80 without one
    }


def _prefect_database() -> Path:
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    url = str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value())
    assert url.startswith("sqlite+aiosqlite:///"), url
    path = Path(url.removeprefix("sqlite+aiosqlite:///"))
    assert path.exists(), path
    return path


def _files_holding(secret: str, *roots: Path) -> list[str]:
    """Every file under ``roots`` whose bytes hold ``secret`` (as typed, or percent-encoded)."""
    needles = {secret.encode(), secret.encode("utf-16-le")}
    found = []
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path))
    return found


def _prefect_files() -> list[Path]:
    """Prefect's database and its journal (a page not yet checkpointed lives in the -wal file)."""
    db = _prefect_database()
    return [p for p in db.parent.iterdir() if p.name.startswith(db.name)]


# --------------------------------------------------------------------------- redaction itself


def test_store_urls_lose_their_password_and_find_it_again_only_for_the_same_database():
    from labtwin.data.engine import describe_url
    from labtwin.data.store_secret import resolve_password, split_password, store_line_of, without_password

    url = (
        f"postgresql://lab:{STORE_PW}@db.lab:5433/labtwin?options=-csearch_path%3Dx&password={STORE_PW}&sslmode=require"
    )
    assert split_password(url) == (
        "postgresql://lab@db.lab:5433/labtwin?options=-csearch_path%3Dx&sslmode=require",
        STORE_PW,
    )
    assert STORE_PW not in describe_url(url) and "sslmode=require" in describe_url(url)
    assert STORE_PW not in describe_url(f"postgresql://lab:{STORE_PW[:3]}/{STORE_PW}@db/x")  # an unencoded '/'
    assert without_password("labtwin-data/labtwin.db") == "labtwin-data/labtwin.db"
    bare = without_password(url)
    other = f"postgresql://lab:{STORE_PW}@db.lab:5433/otherdb"
    assert resolve_password(bare, [("LABTWIN_STORE", other)]).url == bare  # another database lends nothing
    found = resolve_password(bare, [("LABTWIN_STORE", None), ("the lab file's store:", url)])
    assert (found.url, found.source) == (url, "the lab file's store:")
    assert "libpq" in resolve_password(bare, []).source
    assert store_line_of("/no/such/lab.yaml") is None


def test_every_log_record_is_redacted_whichever_handler_it_reaches(tmp_path):
    from labtwin.security.log_redaction import RedactingFilter, install_log_redaction

    install_log_redaction()
    install_log_redaction()  # idempotent
    path = tmp_path / "library.log"
    handler = logging.FileHandler(path)  # added after the installation, as Prefect adds its own
    handler.setFormatter(logging.Formatter("%(message)s"))
    library = logging.getLogger(f"some.library.{uuid.uuid4().hex[:6]}")
    library.addHandler(handler)
    library.propagate = False
    try:
        library.warning("connecting to %s", f"postgresql://u:{STORE_PW}@h/db")
        try:
            raise ConnectionError(f"mqtt://user:{BROKER_PW}@h:1883 refused")
        except ConnectionError:
            library.exception("cannot connect (password=%s)", BROKER_PW)
    finally:
        handler.close()
        library.removeHandler(handler)
    text = path.read_text()
    assert "postgresql://u:***@h/db" in text and "mqtt://user:***@h:1883 refused" in text, text
    assert BROKER_PW not in text and STORE_PW not in text
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "url %s", (f"mqtt://a:{BROKER_PW}@h",), None)
    assert RedactingFilter().filter(record) and BROKER_PW not in record.getMessage()


def test_instrument_audit_lines_hide_a_password_in_the_resource(tmp_path):
    from labtwin.instruments.transport import AuditTrail

    trail = AuditTrail(tmp_path / "audit.jsonl")
    trail.record(f"rfc2217://tech:{BROKER_PW}@10.0.0.7:4000", ">", "*IDN?")
    line = json.loads((tmp_path / "audit.jsonl").read_text())
    assert line["resource"] == "rfc2217://tech:***@10.0.0.7:4000" and line["text"] == "*IDN?"


# --------------------------------------------------------------------------- error lines and --json


def _one_line_without(result, secret: str, *names: str) -> str:
    assert result.exit_code != 0, result.output
    assert secret not in result.stdout and secret not in result.stderr, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.slow  # the bus tries an unreachable broker for ~10 s before it gives up
def test_an_unreachable_broker_is_named_without_its_password(tmp_path):
    lab = _lab_file(tmp_path, f"nosecret{uuid.uuid4().hex[:6]}")
    port = _free_port()  # nobody listens there
    broker = f"mqtt://user:{BROKER_PW}@127.0.0.1:{port}"
    run = ["run", "lto_formation", "--channel", "ch1", "--lab", str(lab), "--broker", broker, "--json"]
    line = _one_line_without(runner.invoke(app, run), BROKER_PW, f"127.0.0.1:{port}")
    assert f"user@127.0.0.1:{port}" in line or f"user:***@127.0.0.1:{port}" in line, line


def test_errors_name_a_broker_or_store_url_without_its_password(tmp_path):
    lab = _lab_file(tmp_path, f"nosecret{uuid.uuid4().hex[:6]}")
    port = _free_port()
    bad_scheme = [
        "agent",
        "--channel",
        "ch1",
        "--lab",
        str(lab),
        "--broker",
        f"http://user:{BROKER_PW}@127.0.0.1:{port}",
    ]
    _one_line_without(runner.invoke(app, bad_scheme), BROKER_PW, f"127.0.0.1:{port}")
    bad_store = f"postgresql://postgres:{STORE_PW}@127.0.0.1:{_free_port()}/postgres"
    (tmp_path / "campaign.yaml").write_text(
        f"campaign: c\nlab: {lab}\ncells:\n  - id: A\n    channels: [ch1]\n    protocols: [lto_formation]\n"
    )
    for args in (
        ["runs", "--store", bad_store, "--json"],
        ["db", "current", "--store", bad_store, "--json"],
        ["campaign", "status", str(tmp_path / "campaign.yaml"), "--store", bad_store],
        ["campaign", "run", str(tmp_path / "campaign.yaml"), "--store", bad_store],
        ["campaign", "run", str(tmp_path / "campaign.yaml"), "--store", f"mysql://root:{STORE_PW}@127.0.0.1/lab"],
    ):
        _one_line_without(runner.invoke(app, args), STORE_PW, "127.0.0.1")
    # `runs` lets parse_url's ValueError through as a traceback (not this file's to fix): its message is redacted.
    result = runner.invoke(app, ["runs", "--store", f"mysql://root:{STORE_PW}@127.0.0.1/lab", "--json"])
    assert result.exit_code != 0 and STORE_PW not in result.stdout + result.stderr + str(result.exception)


# --------------------------------------------------------------------------- the lab's processes


@pytest.mark.slow
def test_agent_record_twin_and_run_never_show_the_broker_password(tmp_path, broker_port, prefect_api):
    lab_name = f"nosecret{uuid.uuid4().hex[:6]}"
    lab = _lab_file(tmp_path, lab_name)
    (tmp_path / "short.yaml").write_text(PROTOCOL)
    broker = f"mqtt://user:{BROKER_PW}@127.0.0.1:{broker_port}"
    store = tmp_path / "store.db"
    env = _prefect_env()
    common = ["--broker", broker, "--lab", str(lab), "-v"]
    logs = {name: tmp_path / f"{name}.log" for name in ("agent", "record", "twin")}
    procs = {
        "agent": _start(["agent", "--channel", "ch1", *common], logs["agent"], env),
        "record": _start(["record", "--store", str(store), *common], logs["record"], env),
        "twin": _start(["twin", *common], logs["twin"], env),
    }
    try:
        for name, proc in procs.items():
            started = lambda n=name: "Ctrl-C stop" in " ".join(logs[n].read_text(errors="replace").split())  # noqa: E731
            _wait_for(f"labtwin {name}", started, proc, logs[name])
        run = subprocess.run(
            [
                *LABTWIN,
                "run",
                str(tmp_path / "short.yaml"),
                "--channel",
                "ch1",
                "--store",
                str(store),
                "--json",
                *common,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        for proc in procs.values():
            _stop(proc)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["exit_status"] == "success"
    assert BROKER_PW not in run.stdout and BROKER_PW not in run.stderr, run.stderr
    for name, log in logs.items():
        text = log.read_text(errors="replace")
        assert f"user@127.0.0.1:{broker_port}" in text, (name, text)  # the start-up line names the broker
        assert BROKER_PW not in text, (name, text)
    assert _files_holding(lab_name, *_prefect_files()), "the run's parameters are not in the database grepped"
    assert not _files_holding(BROKER_PW, tmp_path, *_prefect_files())


@pytest.mark.slow
def test_a_campaign_with_a_postgres_password_keeps_it_off_prefect(tmp_path, prefect_api, postgres_url):
    from labtwin.data.store import Store

    lab = _lab_file(tmp_path, f"nosecret{uuid.uuid4().hex[:6]}")
    (tmp_path / "short.yaml").write_text(PROTOCOL)
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        "campaign: nosecret\ncells:\n  - id: A\n    channels: [ch1]\n"
        f"    protocols: [{tmp_path / 'short.yaml'}]\n    nominal_capacity_Ah: 5.18e-5\n"
    )
    store = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{STORE_PW}@", 1)
    assert STORE_PW in store
    proc = subprocess.run(
        [*LABTWIN, "campaign", "run", str(campaign), "--lab", str(lab), "--store", store],
        capture_output=True,
        text=True,
        env=_prefect_env(),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "success" in proc.stdout
    assert STORE_PW not in proc.stdout + proc.stderr
    s = Store.open(postgres_url)
    try:
        (row,) = s.runs()
        assert row.exit_status == "success" and row.stored_samples > 0  # the recorder wrote it all
    finally:
        s.close()
    schema = postgres_url.rpartition("%3D")[2]  # the test's own schema: in the flows' store_url parameter
    assert _files_holding(schema, *_prefect_files()), "the campaign's parameters are not in the database grepped"
    assert not _files_holding(STORE_PW, tmp_path, *_prefect_files())


def test_the_flow_resolves_the_store_password_where_it_runs(tmp_path, monkeypatch):
    """What a flow given the URL without its password opens: with LABTWIN_STORE's password (an in-process
    `campaign run`), else with the lab file's, never one of another database's."""
    if not reachable(POSTGRES):
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    from labtwin.orchestration.campaign_flow import store_where_it_runs

    base = "postgresql://postgres@127.0.0.1:5432/postgres"
    full = base.replace("postgres@", f"postgres:{STORE_PW}@", 1)
    lab = _lab_file(tmp_path, "resolve", store=full)
    monkeypatch.setenv("LABTWIN_STORE", full)
    for expected, lab_file in ((full, None), (full, str(lab))):
        store = store_where_it_runs(base, lab_file)
        try:
            assert store.url == expected
        finally:
            store.close()
    monkeypatch.delenv("LABTWIN_STORE")
    store = store_where_it_runs(base, str(lab))
    try:
        assert store.url == full  # from the lab file's store:
    finally:
        store.close()
    monkeypatch.setenv("LABTWIN_STORE", full.replace("/postgres", "/template1"))
    store = store_where_it_runs(base, str(tmp_path / "nowhere.yaml"))
    try:
        assert store.url == base  # another database lends nothing: libpq's PGPASSWORD or ~/.pgpass, if any
    finally:
        store.close()


@pytest.mark.slow
def test_a_served_campaign_keeps_the_store_password_off_its_deployments(tmp_path, prefect_api, postgres_url):
    """`campaign serve` to the session's Prefect server: the deployments' store_url has no password, and the
    Runner's flow-run process (a process of its own) resolves it from the environment it inherits."""
    from labtwin.data.store import Store

    lab = _lab_file(tmp_path, f"nosecret{uuid.uuid4().hex[:6]}")
    (tmp_path / "short.yaml").write_text(PROTOCOL)
    campaign = tmp_path / "campaign.yaml"
    campaign.write_text(
        "campaign: served\ncells:\n  - id: A\n    channels: [ch1]\n"
        f"    protocols: [{tmp_path / 'short.yaml'}]\n    nominal_capacity_Ah: 5.18e-5\n"
    )
    store = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{STORE_PW}@", 1)
    done = subprocess.run(
        [*LABTWIN, "campaign", "serve", str(campaign), "--lab", str(lab), "--store", store, "--for", "5s", "--json"],
        cwd=tmp_path,
        env=_prefect_env(),  # the deployments go to the session's Prefect server
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert STORE_PW not in done.stdout + done.stderr
    schema = postgres_url.rpartition("%3D")[2]
    assert _files_holding(schema, *_prefect_files()), "the deployments' parameters are not in the database grepped"
    assert not _files_holding(STORE_PW, tmp_path, *_prefect_files())
    assert [r["state"] for r in json.loads(done.stdout)] == ["Completed"], done.stdout + done.stderr[-5000:]
    s = Store.open(postgres_url)
    try:
        (row,) = s.runs()
        assert row.exit_status == "success" and row.stored_samples > 0
    finally:
        s.close()
