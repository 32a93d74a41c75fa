"""The whole lab over mqtts with the files `labtwin lab secure` wrote, role by role, through labtwin's own commands.

Everything here is a subprocess a lab would start (issue 13, "Done means"): `labtwin lab secure` on a copy of the
packaged lab file, a real Mosquitto on its TLS, password and ACL files (tests/secure_broker.py), then `labtwin demo`,
`labtwin agent`, `record`, `run`, `pause`, `resume` and `monitor`. No process gets a secret on its command line:
each picks its identity itself (agent-ch1, recorder, orchestrator, operator, viewer) and reads its password, client
certificate and signing key through the lab file's `security:` line or LABTWIN_SECURITY. The test-only changes are
the broker's (a free loopback port) and the generated lab file's broker line pointing at that port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from labtwin.config.secure_lab import secure_lab
from labtwin.data.store import Store
from tests.secure_broker import SecureBroker, mosquitto_binary

pytestmark = pytest.mark.usefixtures("prefect_api")

LABTWIN = [sys.executable, "-c", "from labtwin.cli import main; main()"]
PACKAGED_LAB = Path(__file__).resolve().parents[2] / "labtwin" / "config" / "lab.yaml"
IDENTITIES = ("agent-ch1", "agent-ch2", "orchestrator", "recorder", "twin", "operator", "viewer")
# A few minutes of cell time on ch1's LTO film; at --speed 30 about 34 s of wall time, long enough to pause a
# viewer's refused pause (10 s until the operator command gives up), then the operator's pause and resume.
PROTOCOL = """metadata:
  name: secured lab e2e
  chemistry: LTO|Li
  nominal_capacity_Ah: 5.18e-5
record: {interval_s: 1}
safety: {voltage_min_V: 0.05, voltage_max_V: 3.1}
method:
  - rest: {duration_s: 60}
  - cc: {c_rate: -0.1, until: {time_s: 900, voltage_V: 0.1}}
  - rest: {duration_s: 60}
"""
SPEED = "30"


@dataclass(frozen=True)
class SecuredDemo:
    root: Path
    out: Path  # what `labtwin lab secure` wrote
    broker: SecureBroker
    api_url: str  # the session's Prefect API: subprocesses use it rather than start their own

    @property
    def lab_file(self) -> Path:
        return self.out / "lab.yaml"

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.broker.port}"

    def password(self, identity: str) -> str:
        return (self.out / identity / "password").read_text(encoding="utf-8").strip()

    def secrets(self) -> list[str]:
        """Every password and private key line the lab has: none may show in any output."""
        found = [self.password(i) for i in IDENTITIES]
        for key in [self.out / i / f for i in IDENTITIES for f in ("client.key", "signing.key")]:
            found += [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
        return found

    def env(self, **extra: str) -> dict[str, str]:
        """The environment a lab machine has: none of this shell's LABTWIN_* settings, the session's Prefect."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABTWIN_")}
        env.update(PREFECT_API_URL=self.api_url, COLUMNS="200", **extra)
        return env


def secure(lab_file: Path, out: Path, *flags: str) -> Path:
    done = subprocess.run(
        [*LABTWIN, "lab", "secure", str(lab_file), "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def point_at(lab_file: Path, port: int) -> None:
    """The generated lab file's broker line at the test's port (the generated one says 8883)."""
    text, n = re.subn(
        r"(?m)^broker: mqtts://localhost:8883\s*$", f"broker: mqtts://localhost:{port}", lab_file.read_text()
    )
    assert n == 1, f"{lab_file} has no `broker: mqtts://localhost:8883` line"
    lab_file.write_text(text)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, prefect_api) -> Iterator[SecuredDemo]:
    from prefect.settings import PREFECT_API_URL

    mosquitto_binary()  # skip before anything starts where Mosquitto is missing
    root = tmp_path_factory.mktemp("secured-demo")
    shutil.copy(PACKAGED_LAB, root / "lab.yaml")
    out = secure(root / "lab.yaml", root / "secured")
    with SecureBroker(out, root / "broker") as broker:
        point_at(out / "lab.yaml", broker.port)
        yield SecuredDemo(root, out, broker, str(PREFECT_API_URL.value()))
    # Mosquitto ran with `persistence false`: stopping it leaves no retained topic anywhere.


class Processes:
    """Long-running labtwin commands of one test, each in its own session, stopped by pid at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.files: list = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        stdout, stderr = (self.root / f"{name}.out").open("w"), (self.root / f"{name}.err").open("w")
        self.files += [stdout, stderr]
        proc = subprocess.Popen(
            [*LABTWIN, *args],
            env=env,
            cwd=self.root,
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text() + (self.root / f"{name}.err").read_text()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # SIGINT: Ctrl-C, how a lab stops an agent or a recorder
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for f in self.files:
            f.close()


def labtwin(secured: SecuredDemo, *args: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABTWIN, *args],
        env=secured.env(**env),
        cwd=secured.root,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def assert_no_secret(secured: SecuredDemo, *texts: str) -> None:
    for secret in secured.secrets():
        for text in texts:
            assert secret not in text


def connected_users(broker: SecureBroker, since: int = 0) -> set[str]:
    """Broker users that connected, from the broker log's character ``since`` on."""
    log = broker.log_text()[since:]
    return set(re.findall(r"New client connected from \S+ as \S+ \(.*?u'([^']+)'\)", log))


def wait_connected(
    broker: SecureBroker, users: set[str], procs: Processes, since: int, timeout_s: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not users <= connected_users(broker, since):
        for name, proc in procs.procs.items():
            assert proc.poll() is None, f"{name} exited {proc.returncode}: {procs.output(name)[-2000:]}"
        assert time.monotonic() < deadline, f"never connected: {users - connected_users(broker, since)}"
        time.sleep(0.1)


def stored(db: Path) -> list:
    store = Store.open(str(db), read_only=True)
    try:
        return store.runs()
    finally:
        store.close()


# --------------------------------------------------------------------------- the demo


@dataclass
class DemoRun:
    """`labtwin demo` on a Mosquitto of its own, started before the module's first test and awaited by the last.

    It runs while the other tests do (its runs go at max speed, theirs on the wall clock), which keeps the module
    under two minutes; its broker is another Mosquitto on the same generated files, so no topic is shared.
    """

    args: list[str]
    db: Path
    broker: SecureBroker
    proc: subprocess.Popen[str]
    stdout: Path
    stderr: Path


@pytest.fixture(scope="module", autouse=True)
def demo(secured: SecuredDemo) -> Iterator[DemoRun]:
    db = secured.root / "demo.db"
    with SecureBroker(secured.out, secured.root / "demo-broker") as broker:
        args = [
            "demo",
            "--broker",
            f"mqtts://localhost:{broker.port}",
            "--store",
            str(db),
            "--out",
            str(secured.root / "plots"),
            "--json",
        ]
        out, err = secured.root / "demo.out", secured.root / "demo.err"
        # Its own working directory: the separate-processes test runs an agent for the same lab and channel at the
        # same time, and two agents of one channel in one directory share its spool (./labtwin-data/spool).
        cwd = secured.root / "demo-cwd"
        cwd.mkdir(exist_ok=True)
        with out.open("w") as fout, err.open("w") as ferr:
            proc = subprocess.Popen(
                [*LABTWIN, *args],
                env=secured.env(LABTWIN_SECURITY=str(secured.out / "security.yaml")),
                cwd=cwd,
                stdout=fout,
                stderr=ferr,
                text=True,
                start_new_session=True,
            )
        try:
            yield DemoRun(args, db, broker, proc, out, err)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


# --------------------------------------------------------------------------- separate processes


def test_agent_recorder_and_run_as_separate_processes_with_a_viewer_and_an_operator(secured: SecuredDemo) -> None:
    db = secured.root / "separate.db"
    protocol = secured.root / "short.yaml"
    protocol.write_text(PROTOCOL)
    lab = str(secured.lab_file)
    env = secured.env()
    procs = Processes(secured.root)
    since = len(secured.broker.log_text())  # this test's clients only (another test may have connected before)
    try:
        procs.start("agent", ["agent", "--channel", "ch1", "--lab", lab, "--speed", SPEED], env)
        procs.start("record", ["record", "--lab", lab, "--store", str(db)], env)
        wait_connected(secured.broker, {"demo-agent-ch1", "demo-recorder"}, procs, since)
        run = procs.start(
            "run", ["run", str(protocol), "--channel", "ch1", "--lab", lab, "--store", str(db), "--json"], env
        )
        deadline = time.monotonic() + 60
        while not any(r.stored_samples > 5 for r in (stored(db) if db.exists() else [])):
            assert run.poll() is None, procs.output("run")[-3000:]
            assert time.monotonic() < deadline, "the run never reached the store"
            time.sleep(0.3)

        # A viewer's pause: the broker's ACL drops the publish; nothing confirms it, the run goes on.
        before = stored(db)[0].stored_samples
        viewer = labtwin(
            secured,
            "pause",
            "--channel",
            "ch1",
            "--lab",
            lab,
            LABTWIN_BROKER_USERNAME="demo-viewer",
            LABTWIN_BROKER_PASSWORD=secured.password("viewer"),
        )
        assert viewer.returncode == 3, viewer.stdout + viewer.stderr
        line = one_line(viewer.stderr)
        assert "not acknowledged" in line or "refused" in line, line
        assert "'demo-viewer'" in line, line  # the broker user whose publish the ACL dropped
        assert "paused run" not in viewer.stdout
        assert_no_secret(secured, viewer.stdout, viewer.stderr)
        assert run.poll() is None, procs.output("run")[-3000:]
        (row,) = stored(db)
        assert row.exit_status is None and row.stored_samples > before, row  # still running, still sampling

        operator = labtwin(secured, "pause", "--channel", "ch1", "--lab", lab)
        assert operator.returncode == 0, operator.stdout + operator.stderr
        assert f"paused run {row.run_id} on ch1" in operator.stdout
        resumed = labtwin(secured, "resume", "--channel", "ch1", "--lab", lab)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"resumed run {row.run_id} on ch1" in resumed.stdout
        assert run.poll() is None, "the run ended before the resume: give the protocol more cell time"

        assert run.wait(90) == 0, procs.output("run")[-3000:]
        summary = json.loads((secured.root / "run.out").read_text())
        assert summary["exit_status"] == "success" and summary["run_id"] == row.run_id, summary
        deadline = time.monotonic() + 20
        while (row := stored(db)[0]).exit_status is None or row.stored_samples < (row.reported_samples or 0):
            assert time.monotonic() < deadline, f"the recorder never stored the whole run: {row}"
            time.sleep(0.2)
        assert row.exit_status == "success" and row.conflicts == 0, row
        assert row.stored_samples == row.reported_samples > 500, row
        assert {"demo-orchestrator", "demo-operator", "demo-viewer"} <= connected_users(secured.broker, since)
    finally:
        procs.stop_all()
    for name in procs.procs:
        assert_no_secret(secured, procs.output(name))
    services = procs.output("agent") + procs.output("record")
    assert "Traceback" not in services, services[-3000:]
    # Every document the agent and the recorder received verified: the operator's and orchestrator's commands,
    # the agent's own status read back (its ACL line is readwrite), its batches and events.
    assert "refused a payload" not in services and "not signed by this agent" not in services, services[-3000:]


# --------------------------------------------------------------------------- refused connections


def test_a_wrong_password_is_a_refused_user_not_an_unreachable_broker(secured: SecuredDemo) -> None:
    done = labtwin(
        secured, "monitor", "--seconds", "1", "--lab", str(secured.lab_file), LABTWIN_BROKER_PASSWORD="wrong"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "refused user 'demo-viewer'" in line and "cannot reach" not in line, line
    assert "wrong" not in line  # not even the wrong password is printed


@pytest.fixture(scope="module")
def other_ca(secured: SecuredDemo) -> Path:
    """Another run of `labtwin lab secure` on the same lab file: its own CA, certificates and passwords."""
    return secure_lab(secured.root / "lab.yaml", secured.root / "other-ca").out


def test_another_labs_ca_is_a_tls_failure(secured: SecuredDemo, other_ca: Path) -> None:
    done = labtwin(
        secured, "monitor", "--seconds", "1", "--lab", str(secured.lab_file), LABTWIN_TLS_CA=str(other_ca / "ca.crt")
    )
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "TLS" in line and "cannot reach" not in line, line


def test_a_client_certificate_from_another_ca_is_a_tls_failure_with_mtls(secured: SecuredDemo, other_ca: Path) -> None:
    """A --mtls lab: the broker checks every client's certificate against its CA (after a TLS 1.3 client's
    handshake, so the client learns it from the alert on its first read)."""
    root = secured.root / "mtls"
    root.mkdir()
    shutil.copy(PACKAGED_LAB, root / "lab.yaml")
    out = secure(root / "lab.yaml", root / "secured", "--mtls")
    with SecureBroker(out, root / "broker") as broker:
        point_at(out / "lab.yaml", broker.port)
        lab = str(out / "lab.yaml")
        own = labtwin(secured, "monitor", "--seconds", "1", "--lab", lab)
        assert own.returncode == 0, own.stdout + own.stderr  # its own certificate: accepted
        done = labtwin(
            secured,
            "monitor",
            "--seconds",
            "1",
            "--lab",
            lab,
            LABTWIN_TLS_CERT=str(other_ca / "viewer" / "client.crt"),
            LABTWIN_TLS_KEY=str(other_ca / "viewer" / "client.key"),
        )
        assert "certificate verify failed" in broker.log_text()  # the broker refused it
    assert done.returncode == 2, done.stdout + done.stderr
    line = one_line(done.stderr)
    assert "TLS" in line and "client certificate" in line and "cannot reach" not in line, line
    assert_no_secret(secured, done.stdout, done.stderr)


def test_the_demo_runs_over_mqtts_and_stores_every_sample(secured: SecuredDemo, demo: DemoRun) -> None:
    """Last in the module: the demo started with it and has had the other tests' time to run."""
    assert_no_secret(secured, " ".join(demo.args))  # nothing secret on its command line
    try:
        rc = demo.proc.wait(240)  # it has run beside the other tests; on a loaded CI machine it takes minutes
    except subprocess.TimeoutExpired:
        pytest.fail(f"the demo did not end: {demo.stderr.read_text()[-3000:]}")
    stdout, stderr = demo.stdout.read_text(), demo.stderr.read_text()
    assert rc == 0, stderr[-3000:]
    assert_no_secret(secured, stdout, stderr)
    result = json.loads(stdout)
    summaries = {s["run_id"]: s for s in result["summaries"]}
    assert {s["channel"] for s in summaries.values()} == {"ch1", "ch2"}
    assert all(s["exit_status"] == "success" for s in summaries.values()), summaries

    runs = json.loads(labtwin(secured, "runs", "--store", str(demo.db), "--json").stdout)
    by_id = {r["run_id"]: r for r in runs}
    assert set(by_id) == set(summaries)
    for run_id, summary in summaries.items():
        row = by_id[run_id]
        # RunStop's n_samples (signed by the channel's agent) is what the store counted as reported.
        assert row["reported_samples"] == summary["n_samples"] > 1000, row
        assert row["stored_samples"] == summary["n_samples"], row
        assert row["exit_status"] == "success" and row["conflicts"] == 0, row

    # Each component went to the broker as itself, with its own password.
    users = connected_users(demo.broker)
    for ident in ("agent-ch1", "agent-ch2", "recorder", "twin", "orchestrator", "viewer"):
        assert f"demo-{ident}" in users, users
