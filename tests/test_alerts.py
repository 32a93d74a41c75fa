"""Alerts reach people: a real SMTP server with STARTTLS and a real HTTP receiver on 127.0.0.1 get exactly one
message per rule firing, each with the cell, the kind and the link to the run page; documents go through a real
broker (the embedded one) to the alert service, as `labtwin alerts watch` runs it.

The SMTP server is aiosmtpd with a certificate this test makes (a CA of its own and a server certificate for
127.0.0.1), requiring STARTTLS before MAIL and a login the sender makes with the password from the environment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from labtwin import bus as busmod
from labtwin.alerts import Alert, AlertEngine, AlertsConfig, AlertService
from labtwin.bus import Bus
from labtwin.cli import app
from labtwin.documents import Anomaly, EndReason, RunStart, RunStop, StepEvent, StepKind

runner = CliRunner()
LAB = "alerts-test"
CELL = "LTO-bare-01"
PASSWORD_ENV = "LABTWIN_TEST_SMTP_PASSWORD"
SMTP_USER, SMTP_PASSWORD = "labtwin", "s3cret-for-this-test"
DASHBOARD = "http://127.0.0.1:8050"


# --------------------------------------------------------------------------- real receivers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key)."""
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def builder(subject: str, issuer: str, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    ca = (
        builder("alerts test CA", "alerts test CA", ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(ca_usage, critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    server = (
        builder("127.0.0.1", "alerts test CA", key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


class Mailbox:
    """What the SMTP server accepted: the parsed messages, and whether each came over TLS after a login."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.over_tls: list[bool] = []
        self.logins: list[str] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(message_from_bytes(envelope.original_content or envelope.content))
        self.over_tls.append(session.ssl is not None and session.authenticated)
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        )
        if ok:
            self.logins.append(SMTP_USER)
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def smtp_server(tmp_path):
    """aiosmtpd on 127.0.0.1 with STARTTLS required before MAIL and a login required (only over TLS)."""
    ca, cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    box = Mailbox()
    controller = Controller(
        box,
        hostname="127.0.0.1",
        port=_free_port(),
        tls_context=context,
        require_starttls=True,
        auth_required=True,
        auth_require_tls=True,
        authenticator=box.authenticate,
    )
    controller.start()
    try:
        yield controller.port, ca, box
    finally:
        controller.stop()


class Receiver:
    """An HTTP server on 127.0.0.1 in a thread that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers: a receiver that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def closed_port() -> int:
    return _free_port()  # bound and released: nothing listens there


# --------------------------------------------------------------------------- configuration


def alerts_config(hook_url: str, smtp_port: int, ca: Path, hook_timeout_s: float = 10.0) -> dict:
    return {
        "dashboard_url": DASHBOARD,
        "destinations": {
            "chat": {"type": "webhook", "url": hook_url, "timeout_s": hook_timeout_s},
            "mail": {
                "type": "email",
                "host": "127.0.0.1",
                "port": smtp_port,
                "ca_file": str(ca),
                "username": SMTP_USER,
                "password_env": PASSWORD_ENV,
                "sender": "labtwin@lab.test",
                "to": ["oncall@lab.test"],
            },
        },
        "rules": [
            {"when": "anomaly", "kinds": ["oscillation_onset"], "to": ["chat", "mail"]},
            {"when": "run_end", "exit_status": ["failed"], "to": ["chat"]},
            {"when": "safety_trip", "to": ["chat", "mail"]},
        ],
    }


def lab_yaml(path: Path, alerts: dict) -> Path:
    lab = {"lab": LAB, "channels": {"ch1": {"driver": "simulated", "cell": "lto-thin-film", "cell_id": CELL}}}
    path.write_text(json.dumps({**lab, "alerts": alerts}))  # JSON is YAML
    return path


# --------------------------------------------------------------------------- documents of one run


def run_start(run_id: str) -> RunStart:
    return RunStart(run_id=run_id, lab=LAB, channel="ch1", cell_id=CELL, protocol="lto_formation", n_steps=6)


def oscillation(run_id: str, step: int, i: int) -> Anomaly:
    return Anomaly(
        kind="oscillation_onset",
        cell=CELL,
        lab=LAB,
        channel="ch1",
        run_id=run_id,
        time_s=3600.0 * step + i,
        cycle=1,
        step=step,
        message=f"voltage oscillation on the plateau, check {i}",
    )


def trip(run_id: str) -> StepEvent:
    reason = EndReason(kind="safety_limit", name="voltage_max_V", value=3.12, threshold=3.1)
    return StepEvent(
        run_id=run_id,
        channel="ch1",
        step_index=4,
        label="charge",
        step=StepKind.cc,
        event="ended",
        time_s=9000.0,
        reason=reason,
    )


def failed(run_id: str) -> RunStop:
    return RunStop(
        run_id=run_id, channel="ch1", exit_status="failed", reason="voltage_max_V", n_samples=900, cell_time_s=9000.0
    )


async def publish_run(url: str, run_id: str) -> int:
    """A run on ch1: 20 oscillation anomalies in each of two half cycles, a safety trip, its RunStop twice (an
    agent says it again to a flow that lost it), and a successful run after it. Returns the documents sent."""
    docs: list[tuple[str, object]] = [(busmod.topic(LAB, "ch1", "event"), run_start(run_id))]
    anomaly_topic = busmod.cell_topic(LAB, CELL, "anomaly")
    docs += [(anomaly_topic, oscillation(run_id, step, i)) for step in (2, 3) for i in range(20)]
    event = busmod.topic(LAB, "ch1", "event")
    docs += [(event, trip(run_id)), (event, failed(run_id)), (event, failed(run_id))]
    docs += [(event, RunStop(run_id=run_id + "-next", channel="ch1", exit_status="success"))]
    async with Bus(url) as bus:
        for topic_name, doc in docs:
            await bus.publish(topic_name, doc)
        await bus.flush()
    return len(docs)


async def until(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- tests


async def test_one_message_per_rule_firing_reaches_the_webhook_and_the_mailbox(
    embedded_broker, smtp_server, receiver, monkeypatch
):
    monkeypatch.setenv(PASSWORD_ENV, SMTP_PASSWORD)
    port, ca, box = smtp_server
    config = AlertsConfig.model_validate(alerts_config(receiver.url, port, ca))
    service = AlertService(embedded_broker.url, config, LAB, {"ch1": CELL})
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(stop))
    try:
        await asyncio.wait_for(service.ready.wait(), 20)
        run_id = "run-alerts-1"
        sent = await publish_run(embedded_broker.url, run_id)
        # Every document taken: 2 + 1 + 1 alerts fired (oscillation per half cycle, the trip, the failed end),
        # the 38 repeated onsets and the repeated RunStop counted as duplicates, the RunStart and success as nothing.
        await until(lambda: service.engine.stats.fired == 4 and service.engine.stats.duplicates == 39, what="documents")
        assert sent == 45
        assert await service.dispatcher.drain(30)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    link = f"{DASHBOARD}/run/{run_id}"
    kinds = sorted(b["kind"] for b in receiver.bodies)
    assert kinds == ["oscillation_onset", "oscillation_onset", "run_failed", "safety_trip"], receiver.bodies
    for body in receiver.bodies:
        assert body["cell"] == CELL and body["lab"] == LAB and body["channel"] == "ch1" and body["run_id"] == run_id
        assert body["link"] == link
        assert CELL in body["text"] and body["kind"] in body["text"] and link in body["text"]
    trip_body = next(b for b in receiver.bodies if b["kind"] == "safety_trip")
    assert "voltage_max_V" in trip_body["message"] and "3.12" in trip_body["message"]
    assert sorted(b["message"].split(",")[0] for b in receiver.bodies if b["kind"] == "oscillation_onset") == [
        "voltage oscillation on the plateau",
        "voltage oscillation on the plateau",
    ]

    assert len(box.messages) == 3 and all(box.over_tls) and box.logins == [SMTP_USER] * 3
    assert sorted(m["Subject"].split("] ")[1].split(" on ")[0] for m in box.messages) == [
        "oscillation_onset",
        "oscillation_onset",
        "safety_trip",
    ]
    for m in box.messages:
        body = m.get_payload(decode=True).decode()
        assert CELL in m["Subject"] and link in body and f"cell: {CELL}" in body
        assert m["To"] == "oncall@lab.test" and m["From"] == "labtwin@lab.test"
    assert service.dispatcher.failed == {}


async def test_a_hanging_receiver_logs_one_line_and_holds_up_neither_the_mail_nor_the_service(
    embedded_broker, smtp_server, silent_port, monkeypatch, caplog
):
    monkeypatch.setenv(PASSWORD_ENV, SMTP_PASSWORD)
    port, ca, box = smtp_server
    hook = f"http://127.0.0.1:{silent_port}/hook"
    timeout_s = 3.0
    config = AlertsConfig.model_validate(alerts_config(hook, port, ca, hook_timeout_s=timeout_s))
    service = AlertService(embedded_broker.url, config, LAB, {"ch1": CELL})
    stop = asyncio.Event()
    task = asyncio.create_task(service.serve(stop, drain_s=15))
    caplog.set_level(logging.WARNING, logger="labtwin.alerts")
    try:
        await asyncio.wait_for(service.ready.wait(), 20)
        started = time.monotonic()
        await publish_run(embedded_broker.url, "run-alerts-2")
        await until(lambda: len(box.messages) == 3, what="the three e-mails")
        # Behind the webhook, the third e-mail would wait for two or three of its timeouts.
        assert time.monotonic() - started < 1.7 * timeout_s, "the mail waited for the hanging webhook"
        await until(lambda: service.dispatcher.failed["chat"] == 4, timeout_s=30, what="the webhook's timeouts")
        assert not task.done()
        async with Bus(embedded_broker.url) as bus:  # the service still follows the lab
            await bus.publish(busmod.topic(LAB, "ch1", "event"), trip("run-alerts-3"))
        await until(lambda: len(box.messages) == 4, what="the e-mail after the failures")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    lines = [r.getMessage() for r in caplog.records if "chat" in r.getMessage()]
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    assert all(f"127.0.0.1:{silent_port}" in line and "not sent" in line for line in lines)
    assert "/hook" not in " ".join(lines)  # a webhook's path is its token: never logged
    assert service.dispatcher.sent["mail"] == 4


def test_min_interval_holds_back_a_rule_and_counts_what_it_held():
    now = [1000.0]
    config = AlertsConfig.model_validate(
        {"rules": [{"when": "anomaly", "kinds": ["oscillation_onset"], "min_interval_s": 600}]}
    )
    engine = AlertEngine(config, LAB, clock=lambda: now[0])
    fired = [a for step in range(5) for i in range(20) for a in engine.take(oscillation("r", step, i))]
    assert len(fired) == 1 and fired[0].suppressed == 0
    assert engine.stats.duplicates == 95 and engine.stats.held_back == 4
    now[0] += 601
    later = engine.take(oscillation("r", 9, 0))
    assert len(later) == 1 and later[0].suppressed == 4 and "4 more held back" in later[0].text


def test_an_anomaly_of_another_kind_fires_once_per_run():
    config = AlertsConfig.model_validate({"rules": [{"when": "anomaly"}]})
    engine = AlertEngine(config, LAB)
    fade = Anomaly(kind="capacity_fade", cell=CELL, run_id="r", time_s=1.0, cycle=3, message="fade")
    assert len(engine.take(fade)) == 1
    assert engine.take(fade.model_copy(update={"cycle": 4})) == []
    assert len(engine.take(fade.model_copy(update={"run_id": "r2"}))) == 1


async def test_email_refuses_a_certificate_it_cannot_verify_and_names_a_refused_login(smtp_server, monkeypatch):
    from labtwin.alerts import EmailDestination, EmailSender, SendError

    port, ca, box = smtp_server
    mail = alerts_config("http://127.0.0.1:9/hook", port, ca)["destinations"]["mail"]
    alert = Alert(lab=LAB, cell=CELL, kind="test", message="m", link=f"{DASHBOARD}/")
    monkeypatch.setenv(PASSWORD_ENV, SMTP_PASSWORD)
    untrusted = EmailSender("mail", EmailDestination.model_validate({**mail, "ca_file": None}))
    with pytest.raises(SendError, match=f"127.0.0.1:{port}: TLS failed"):
        await untrusted.send(alert)  # the system's CAs do not know the test's CA: nothing is sent
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    with pytest.raises(SendError, match=f"127.0.0.1:{port} refused the login of {SMTP_USER}: 535"):
        await EmailSender("mail", EmailDestination.model_validate(mail)).send(alert)
    assert box.messages == []


def test_alerts_test_exits_0_with_both_destinations_up(tmp_path, smtp_server, receiver, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, SMTP_PASSWORD)
    port, ca, box = smtp_server
    lab = lab_yaml(tmp_path / "lab.yaml", alerts_config(receiver.url, port, ca))
    result = runner.invoke(app, ["alerts", "test", "--lab", str(lab)])
    assert result.exit_code == 0, result.output + result.stderr
    assert "chat (webhook): ok" in result.stdout and "mail (email): ok" in result.stdout
    assert len(receiver.bodies) == 1 and receiver.bodies[0]["kind"] == "test"
    assert receiver.bodies[0]["link"] == f"{DASHBOARD}/" and "test-cell" in receiver.bodies[0]["text"]
    assert len(box.messages) == 1 and box.over_tls == [True] and "test" in box.messages[0]["Subject"]


def test_alerts_test_names_the_destination_that_is_down(tmp_path, smtp_server, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, SMTP_PASSWORD)
    port, ca, box = smtp_server
    down = f"http://127.0.0.1:{closed_port()}/hook"
    lab = lab_yaml(tmp_path / "lab.yaml", alerts_config(down, port, ca))
    result = runner.invoke(app, ["alerts", "test", "--lab", str(lab)])
    assert result.exit_code == 1, result.output
    assert "mail (email): ok" in result.stdout
    assert "chat (webhook): FAILED: http://127.0.0.1" in result.stdout and "did not answer" in result.stdout
    assert result.stderr.strip() == "error: 1 of 2 destinations failed: chat"
    assert len(box.messages) == 1


def test_alerts_test_names_a_missing_password_variable(tmp_path, smtp_server, receiver, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    port, ca, _ = smtp_server
    lab = lab_yaml(tmp_path / "lab.yaml", alerts_config(receiver.url, port, ca))
    result = runner.invoke(app, ["alerts", "test", "--lab", str(lab)])
    assert result.exit_code == 1
    assert f"mail (email): FAILED: environment variable {PASSWORD_ENV} (password_env) is not set" in result.stdout


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda a: a["destinations"]["mail"].update(port=70000), "alerts.destinations.mail.email.port"),
        (
            lambda a: a["destinations"]["mail"].update(password="hunter2"),
            "alerts.destinations.mail.email: Value error, a password does not belong in the lab file",
        ),
        (lambda a: a["rules"][0].update(kinds=["oscilation_onset"]), "alerts.rules.0.kinds.0"),
        (lambda a: a["rules"][1].update(to=["pager"]), "alerts: Value error, rules.1.to: no destination 'pager'"),
        (lambda a: a.update(dashboard_url="lab-pc:8050"), "alerts.dashboard_url"),
    ],
)
def test_a_bad_alerts_section_is_one_line_naming_the_field(tmp_path, change, named):
    alerts = alerts_config("http://127.0.0.1:9/hook", 2525, tmp_path / "ca.pem")
    change(alerts)
    lab = lab_yaml(tmp_path / "lab.yaml", alerts)
    result = runner.invoke(app, ["alerts", "test", "--lab", str(lab)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {lab}: ") and named in lines[0], lines
    assert "hunter2" not in result.stderr


def test_the_example_of_docs_alerts_md_is_a_valid_lab_file(tmp_path):
    """The documented section, as YAML (where a key `on:` would read as true), loads as it says."""
    from labtwin.config.lab import load_lab

    doc = (Path(__file__).parents[1] / "docs" / "alerts.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    channels = "channels:\n  ch1: {driver: simulated, cell: lto-thin-film}"
    lab = tmp_path / "lab.yaml"
    lab.write_text(example.replace("channels: {...}", channels))
    alerts = load_lab(lab).alerts
    assert alerts is not None and alerts.dashboard_url == "http://lab-pc.example.org:8050"
    assert [r.when for r in alerts.rules] == ["anomaly", "anomaly", "run_end", "safety_trip"]
    assert alerts.destinations["oncall"].type == "email" and alerts.rules[1].min_interval_s == 3600
