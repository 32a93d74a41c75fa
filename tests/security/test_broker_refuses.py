"""The broker is the first wall: a real Mosquitto with `labtwin lab secure`'s files refuses who it should.

Raw paho clients with the generated files (not labtwin's Bus): what any MQTT tool can do against the broker.
The decisive check for a denied publish is a subscriber that receives nothing of it while the legitimate
publish after it arrives; MQTT v5 also lets the publisher see Mosquitto's "not authorised" (0x87) in PUBACK.
"""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from labtwin.config.secure_lab import SecuredLab, write_password_file
from labtwin.security.connection import tls_context
from tests.secure_broker import SecureBroker
from tests.security.conftest import LAB, make_secured_lab

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86
BASE = f"labtwin/v1/{LAB}"
OWN = object()  # "the identity's own password file"


class Probe:
    """One paho client on its own network thread, keeping every answer of the broker."""

    def __init__(
        self,
        broker: SecureBroker,
        out: Path,
        identity: str | None,
        *,
        password: object = OWN,
        ca: Path | None = None,
        cert_dir: Path | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.broker = broker
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"probe-{identity}-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5
        )
        if identity is not None:
            secret = (out / identity / "password").read_text().strip() if password is OWN else password
            self.client.username_pw_set(f"{LAB}-{identity}", secret if isinstance(secret, str) else None)
        cert = (cert_dir / "client.crt", cert_dir / "client.key") if cert_dir else (None, None)
        if context is not None:
            self.client.tls_set_context(context)
        else:
            self.client.tls_set(
                ca_certs=str(ca or out / "ca.crt"),
                certfile=str(cert[0]) if cert[0] else None,
                keyfile=str(cert[1]) if cert[1] else None,
            )
        self.connack: int | None = None
        self.disconnected = threading.Event()
        self.answered = threading.Event()
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code.value
        self.answered.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnected.set()
        self.answered.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self.pubacks[mid] = reason_code.value
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._cond:
            self.subacks[mid] = [rc.value for rc in reason_codes]
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        with self._cond:
            self.messages.append((message.topic, message.payload))
            self._cond.notify_all()

    def connect(self, timeout_s: float = 5.0) -> int | None:
        """Mosquitto's CONNACK reason code (0: accepted); None: the connection closed without one."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        self.answered.wait(timeout_s)
        if self.connack == 0:
            time.sleep(0.05)  # a TLS 1.3 server refuses a client certificate after the client's handshake ends
        return None if self.disconnected.is_set() and self.connack in (None, 0) else self.connack

    def _wait(self, table: dict, mid: int, timeout_s: float = 5.0):
        with self._cond:
            assert self._cond.wait_for(lambda: mid in table, timeout_s), f"no answer for message {mid}"
            return table[mid]

    def publish(self, topic: str, payload: bytes) -> int:
        """PUBACK's reason code (QoS 1, MQTT v5)."""
        info = self.client.publish(topic, payload, qos=1)
        return int(self._wait(self.pubacks, info.mid))

    def subscribe(self, *filters: str) -> list[int]:
        """SUBACK's reason codes, one per filter (0x01: granted QoS 1)."""
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        return list(self._wait(self.subacks, mid))

    def wait_message(self, topic: str, payload: bytes, timeout_s: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: (topic, payload) in self.messages, timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def other_lab(tmp_path_factory: pytest.TempPathFactory) -> SecuredLab:
    """Another `labtwin lab secure` run of the same lab file: same usernames, its own CA and passwords."""
    return make_secured_lab(tmp_path_factory.mktemp("other-lab"))


def refused_in_tls(p: Probe) -> bool:
    """The broker closed the connection before any CONNACK (TLS 1.3 ends the client's handshake first)."""
    try:
        return p.connect() is None
    except (ssl.SSLError, OSError):
        return True


def probe(broker: SecureBroker, lab: SecuredLab, identity: str | None, **kwargs) -> Probe:
    return Probe(broker, lab.out, identity, **kwargs)


# --------------------------------------------------------------------------- who may connect


def test_each_identity_connects_with_its_own_files(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    for ident in secured_lab.identities:
        with probe(secure_broker, secured_lab, ident.name) as p:
            assert p.connect() == 0, f"{ident.name}: {secure_broker.log_text()[-500:]}"


def test_no_credentials_refused(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    with probe(secure_broker, secured_lab, None) as p:
        assert p.connect() == NOT_AUTHORIZED


def test_wrong_password_refused(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    with probe(secure_broker, secured_lab, "orchestrator", password="not-the-password") as p:
        assert p.connect() in (BAD_CREDENTIALS, NOT_AUTHORIZED)


def test_other_runs_password_refused(
    secure_broker: SecureBroker, secured_lab: SecuredLab, other_lab: SecuredLab
) -> None:
    """The same username from another run (another lab's broker) with its password does not get in here."""
    password = (other_lab.out / "orchestrator" / "password").read_text().strip()
    with probe(secure_broker, secured_lab, "orchestrator", password=password) as p:
        assert p.connect() in (BAD_CREDENTIALS, NOT_AUTHORIZED)


def test_other_runs_ca_fails_the_handshake(
    secure_broker: SecureBroker, secured_lab: SecuredLab, other_lab: SecuredLab
) -> None:
    """A client trusting another run's CA refuses this broker's certificate: nothing is sent, not even a password."""
    with probe(secure_broker, secured_lab, "orchestrator", ca=other_lab.out / "ca.crt") as p:
        with pytest.raises(ssl.SSLCertVerificationError):
            p.connect()


def test_plain_mqtt_on_the_tls_port_refused(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe-plain", protocol=mqtt.MQTTv5)
    c.username_pw_set(f"{LAB}-viewer", (secured_lab.out / "viewer" / "password").read_text().strip())
    answered = threading.Event()
    codes: list[int] = []
    c.on_connect = lambda client, userdata, flags, rc, props: (codes.append(rc.value), answered.set())
    c.on_disconnect = lambda *args: answered.set()
    try:
        c.connect(secure_broker.host, secure_broker.port, keepalive=30)
        c.loop_start()
        answered.wait(5)
    except OSError:
        pass
    finally:
        c.disconnect()
        c.loop_stop()
    assert codes != [0]


# --------------------------------------------------------------------------- who may publish and subscribe where


def test_denied_publishes_never_reach_a_subscriber(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    """A viewer's command, agent-ch1 writing ch2's data and status, a recorder's data, anyone writing outside
    the lab: Mosquitto answers "not authorised" and the recorder sees none of it; agent-ch1's own data arrives."""
    mark = uuid.uuid4().hex[:8].encode()
    forged = [
        ("viewer", f"{BASE}/ch1/cmd"),
        ("agent-ch1", f"{BASE}/ch2/data"),
        ("agent-ch1", f"{BASE}/ch2/status"),
        ("agent-ch1", f"{BASE}/ch1/cmd"),
        ("recorder", f"{BASE}/ch1/data"),  # its one write is a ResendRequest on cmd (policy.COMMANDS_OF)
        ("orchestrator", f"{BASE}/ch1/data"),
        ("orchestrator", "labtwin/v1/otherlab/ch1/cmd"),
        ("twin", f"{BASE}/ch1/status"),
        ("operator", f"{BASE}/cells/c1/state"),
    ]
    with probe(secure_broker, secured_lab, "orchestrator") as watcher:  # the one role that reads commands too
        assert watcher.connect() == 0
        assert watcher.subscribe(f"{BASE}/#") == [1]
        for identity, topic in forged:
            with probe(secure_broker, secured_lab, identity) as p:
                assert p.connect() == 0
                assert p.publish(topic, b"forged " + mark) == NOT_AUTHORIZED, f"{identity} on {topic}"
        with probe(secure_broker, secured_lab, "agent-ch1") as agent:
            assert agent.connect() == 0
            assert agent.publish(f"{BASE}/ch1/data", b"real " + mark) == 0
        assert watcher.wait_message(f"{BASE}/ch1/data", b"real " + mark)
        time.sleep(0.3)  # anything the broker let through would have been queued before the real batch
        assert watcher.messages == [(f"{BASE}/ch1/data", b"real " + mark)]


def test_allowed_publishes_arrive(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    """What each role exists to do still works: commands from orchestrator, operator and twin reach the agent;
    the twin's cell state and every agent topic reach the recorder."""
    mark = uuid.uuid4().hex[:8].encode()
    with probe(secure_broker, secured_lab, "agent-ch1") as agent, probe(secure_broker, secured_lab, "viewer") as viewer:
        assert agent.connect() == 0 and viewer.connect() == 0
        assert agent.subscribe(f"{BASE}/ch1/cmd") == [1]
        assert viewer.subscribe(f"{BASE}/#") == [1]
        for identity in ("orchestrator", "operator", "twin"):
            with probe(secure_broker, secured_lab, identity) as p:
                assert p.connect() == 0
                assert p.publish(f"{BASE}/ch1/cmd", identity.encode() + mark) == 0
                assert agent.wait_message(f"{BASE}/ch1/cmd", identity.encode() + mark), identity
        with probe(secure_broker, secured_lab, "twin") as twin:
            assert twin.connect() == 0
            assert twin.publish(f"{BASE}/cells/LTO-1/state", b"state " + mark) == 0
            assert viewer.wait_message(f"{BASE}/cells/LTO-1/state", b"state " + mark)
        for kind in ("data", "event", "status"):
            assert agent.publish(f"{BASE}/ch1/{kind}", kind.encode() + mark) == 0
            assert viewer.wait_message(f"{BASE}/ch1/{kind}", kind.encode() + mark)


def test_reads_follow_the_acl(secure_broker: SecureBroker, secured_lab: SecuredLab) -> None:
    """Mosquitto 2.0 grants any subscription and applies the read rules to each message it delivers: agent-ch1
    subscribed to everything gets nothing but its own commands, the twin only the channels' data, events, status."""
    mark = uuid.uuid4().hex[:8].encode()
    with (
        probe(secure_broker, secured_lab, "agent-ch1") as nosy,
        probe(secure_broker, secured_lab, "twin") as twin,
        probe(secure_broker, secured_lab, "agent-ch2") as agent2,
        probe(secure_broker, secured_lab, "recorder") as recorder,
        probe(secure_broker, secured_lab, "viewer") as viewer,
    ):
        for p in (nosy, twin, agent2, recorder, viewer):
            assert p.connect() == 0
        assert viewer.subscribe(f"{BASE}/#") == [1]  # a viewer reads the lab, but never a command to capture
        nosy.subscribe("#", f"{BASE}/#", f"{BASE}/ch2/cmd")
        assert twin.subscribe(f"{BASE}/+/data", f"{BASE}/+/event", f"{BASE}/#") == [1, 1, 1]  # twin/service.py's
        assert agent2.subscribe(f"{BASE}/ch2/cmd") == [1]
        assert recorder.subscribe(f"{BASE}/+/data", f"{BASE}/cells/+/state") == [1, 1]  # some of recorder.py's
        with probe(secure_broker, secured_lab, "orchestrator") as orchestrator:
            assert orchestrator.connect() == 0
            assert orchestrator.publish(f"{BASE}/ch2/cmd", b"cmd " + mark) == 0
        assert agent2.publish(f"{BASE}/ch2/data", b"data " + mark) == 0
        assert twin.publish(f"{BASE}/cells/LCO-1/state", b"state " + mark) == 0
        assert agent2.wait_message(f"{BASE}/ch2/cmd", b"cmd " + mark)
        assert recorder.wait_message(f"{BASE}/ch2/data", b"data " + mark)
        assert recorder.wait_message(f"{BASE}/cells/LCO-1/state", b"state " + mark)
        assert twin.wait_message(f"{BASE}/ch2/data", b"data " + mark)
        time.sleep(0.3)
        assert nosy.messages == []
        assert set(twin.messages) == {(f"{BASE}/ch2/data", b"data " + mark)}
        assert set(viewer.messages) == {
            (f"{BASE}/ch2/data", b"data " + mark),
            (f"{BASE}/cells/LCO-1/state", b"state " + mark),
        }


# --------------------------------------------------------------------------- mutual TLS


@pytest.fixture(scope="module")
def mtls_lab(tmp_path_factory: pytest.TempPathFactory) -> SecuredLab:
    return make_secured_lab(tmp_path_factory.mktemp("mtls-lab"), mtls=True)


@pytest.fixture(scope="module")
def mtls_broker(mtls_lab: SecuredLab, tmp_path_factory: pytest.TempPathFactory):
    with SecureBroker(mtls_lab.out, tmp_path_factory.mktemp("mtls-broker")) as broker:
        yield broker


def test_mtls_needs_a_certificate_of_this_ca(
    mtls_broker: SecureBroker, mtls_lab: SecuredLab, other_lab: SecuredLab
) -> None:
    """--mtls: the right password is not enough; a client certificate from another run's CA is refused."""
    with probe(mtls_broker, mtls_lab, "viewer", cert_dir=mtls_lab.out / "viewer") as p:
        assert p.connect() == 0
    with probe(mtls_broker, mtls_lab, "viewer") as p:
        assert refused_in_tls(p)
    with probe(mtls_broker, mtls_lab, "viewer", cert_dir=other_lab.out / "viewer") as p:
        assert refused_in_tls(p)
    log = mtls_broker.log_text()
    assert "peer did not return a certificate" in log and "certificate verify failed" in log
    # The certificate is the identity (use_identity_as_username true): the viewer's certificate with the
    # operator's name and password is still the viewer, who may not command.
    with probe(mtls_broker, mtls_lab, "operator", cert_dir=mtls_lab.out / "viewer") as p:
        assert p.connect() == 0
        assert p.publish(f"{BASE}/ch1/cmd", b"as the operator?") == NOT_AUTHORIZED


def test_labtwins_tls_context_with_strict_x509_checks(mtls_broker: SecureBroker, mtls_lab: SecuredLab) -> None:
    """The context labtwin's own clients use (server name checked), with the strict X.509 checks Python 3.13
    turns on by default: the generated CA, server and client certificates pass them."""
    out = mtls_lab.out
    context = tls_context(out / "ca.crt", out / "operator" / "client.crt", out / "operator" / "client.key")
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    assert context.check_hostname
    with probe(mtls_broker, mtls_lab, "operator", context=context) as p:
        assert p.connect() == 0


# --------------------------------------------------------------------------- the built-in password hashing


def test_builtin_password_hashing_is_accepted_by_mosquitto(secured_lab: SecuredLab, tmp_path: Path) -> None:
    """Where mosquitto_passwd is missing, labtwin writes the $7$ file itself: a real Mosquitto takes it."""
    users = {i.username: (secured_lab.out / i.name / "password").read_text().strip() for i in secured_lab.identities}
    passwd = tmp_path / "passwd-builtin"
    assert write_password_file(passwd, users, tool=None) == "labtwin"
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in passwd.read_text().splitlines())
    with SecureBroker(secured_lab.out, tmp_path / "broker", password_file=passwd) as broker:
        with probe(broker, secured_lab, "agent-ch2") as p:
            assert p.connect() == 0, broker.log_text()[-500:]
        with probe(broker, secured_lab, "agent-ch2", password="wrong") as p:
            assert p.connect() in (BAD_CREDENTIALS, NOT_AUTHORIZED)
