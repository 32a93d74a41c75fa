"""What `labtwin lab secure` writes: certificates, secrets' modes, the profile, the lab file copy, the CLI's lines."""

from __future__ import annotations

import base64
import ipaddress
import shutil
import stat
import subprocess
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from labtwin.cli import app
from labtwin.config.secure_lab import SecuredLab, SecureLabError, acl_rules, mosquitto_hash, secure_lab
from labtwin.security import load_profile
from labtwin.security.policy import may_publish, topic_parts
from labtwin.security.signing import Signer, load_private_key, public_key_b64
from tests.security.conftest import LAB, LAB_FILE, make_secured_lab

KINDS = ("cmd", "data", "event", "status")
PRIVATE = ("ca.key", "server.key", "passwd", "acl")
PRIVATE_PER_IDENTITY = ("password", "client.key", "signing.key")


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_private_files_are_0600(secured_lab: SecuredLab) -> None:
    out = secured_lab.out
    paths = [out / p for p in PRIVATE] + [
        out / i.name / f for i in secured_lab.identities for f in PRIVATE_PER_IDENTITY
    ]
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for ident in secured_lab.identities:
        assert stat.S_IMODE((out / ident.name).stat().st_mode) == 0o700


def test_server_certificate_names_every_host(tmp_path: Path) -> None:
    (tmp_path / "lab.yaml").write_text(LAB_FILE)
    result = secure_lab(tmp_path / "lab.yaml", tmp_path / "out", ["broker.lab", "10.0.0.5", "::1"], 10, False)
    server = cert(result.out / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lab"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert result.broker == "mqtts://broker.lab:8883"
    assert (server.not_valid_after_utc - server.not_valid_before_utc).days == 10
    server.verify_directly_issued_by(cert(result.out / "ca.crt"))


def test_default_hosts_are_localhost_and_loopback(secured_lab: SecuredLab) -> None:
    san = cert(secured_lab.out / "server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_client_certificates_name_the_username(secured_lab: SecuredLab) -> None:
    ca = cert(secured_lab.out / "ca.crt")
    names = [i.name for i in secured_lab.identities]
    assert names == ["agent-ch1", "agent-ch2", "orchestrator", "recorder", "twin", "operator", "viewer"]
    for ident in secured_lab.identities:
        c = cert(secured_lab.out / ident.name / "client.crt")
        assert c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{LAB}-{ident.name}"
        assert list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH
        ]
        c.verify_directly_issued_by(ca)


def test_profile_loads_and_its_keys_sign(secured_lab: SecuredLab) -> None:
    out = secured_lab.out
    profile = load_profile(out / "security.yaml")
    assert profile.lab == LAB and profile.required and profile.broker == "mqtts://localhost:8883"
    assert profile.ca == out / "ca.crt"
    assert profile.agent_of("ch2") == "agent-ch2"
    for ident in secured_lab.identities:
        entry = profile.identity(ident.name)
        assert entry.role is ident.role and entry.username == f"{LAB}-{ident.name}"
        assert entry.password_file == out / ident.name / "password"
        assert entry.signing_key is not None and entry.public_key == public_key_b64(load_private_key(entry.signing_key))
        Signer.from_file(ident.name, entry.signing_key).seal("t", b"x")
    raw = yaml.safe_load((out / "security.yaml").read_text())
    assert raw["ca"] == "ca.crt" and raw["identities"]["agent-ch1"]["cert"] == "agent-ch1/client.crt"  # relative


def test_lab_file_copy_points_at_the_profile(secured_lab: SecuredLab) -> None:
    data = yaml.safe_load((secured_lab.out / "lab.yaml").read_text())
    assert data["broker"] == "mqtts://localhost:8883" and data["security"] == "security.yaml"
    assert data["lab"] == LAB and list(data["channels"]) == ["ch1", "ch2"]
    assert data["channels"]["ch2"] == {"driver": "simulated", "cell": "lco-lgps-glassy-ceramic", "seed": 2}


def test_conf_fragment(tmp_path: Path, secured_lab: SecuredLab) -> None:
    conf = (secured_lab.out / "mosquitto.conf").read_text().splitlines()
    for line in (
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {secured_lab.out.resolve() / 'passwd'}",
        f"acl_file {secured_lab.out.resolve() / 'acl'}",
        "listener 8883",
        f"cafile {secured_lab.out.resolve() / 'ca.crt'}",
        "require_certificate false",
    ):
        assert line in conf
    assert any(line.startswith("max_queued_messages") for line in conf)
    mtls = make_secured_lab(tmp_path, mtls=True)
    conf = (mtls.out / "mosquitto.conf").read_text().splitlines()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf


def test_acl_stays_inside_the_lab(secured_lab: SecuredLab) -> None:
    for ident in secured_lab.identities:
        for access, topic in acl_rules(LAB, ["ch1", "ch2"], ident):
            assert topic.startswith(f"labtwin/v1/{LAB}/"), (ident.name, topic)
            if access == "write" and ident.role.value == "viewer":
                pytest.fail(f"{ident.name} may write {topic}")
            if access == "write" and ident.role.value == "recorder" and not topic.endswith("/cmd"):
                pytest.fail(f"{ident.name} may write {topic}: its one write is a ResendRequest on cmd")


def test_acl_mirrors_the_receivers_policy(secured_lab: SecuredLab) -> None:
    """Every topic of the lab (and of another): the broker lets write exactly whom labtwin.security.policy trusts."""
    topics = [f"labtwin/v1/{lab}/{ch}/{kind}" for lab in (LAB, "other") for ch in ("ch1", "ch2") for kind in KINDS]
    topics += [f"labtwin/v1/{lab}/cells/c1/{kind}" for lab in (LAB, "other") for kind in ("state", "anomaly", "x")]
    for ident in secured_lab.identities:
        rules = acl_rules(LAB, ["ch1", "ch2"], ident)
        for topic in topics:
            allowed = any(a in ("write", "readwrite") and mqtt.topic_matches_sub(t, topic) for a, t in rules)
            parts = topic_parts(topic)
            trusted = parts is not None and parts[0] == LAB and may_publish(ident.role, ident.channel, *parts[1:])
            assert allowed == trusted, (ident.name, topic)


def test_an_agent_reads_only_its_commands_and_status(secured_lab: SecuredLab) -> None:
    agent = next(i for i in secured_lab.identities if i.name == "agent-ch1")
    reads = {t for a, t in acl_rules(LAB, ["ch1", "ch2"], agent) if a in ("read", "readwrite")}
    assert reads == {f"labtwin/v1/{LAB}/ch1/cmd", f"labtwin/v1/{LAB}/ch1/status"}


def test_refuses_a_non_empty_out_without_force(tmp_path: Path) -> None:
    first = make_secured_lab(tmp_path)
    before = (first.out / "ca.crt").read_bytes()
    with pytest.raises(SecureLabError, match="--force"):
        make_secured_lab(tmp_path)
    assert (first.out / "ca.crt").read_bytes() == before
    again = secure_lab(tmp_path / "lab.yaml", first.out, None, 5, True)
    assert (again.out / "ca.crt").read_bytes() != before
    assert stat.S_IMODE((again.out / "ca.key").stat().st_mode) == 0o600


def test_never_overwrites_its_own_lab_file(tmp_path: Path) -> None:
    (tmp_path / "lab.yaml").write_text(LAB_FILE)
    with pytest.raises(SecureLabError, match="would overwrite the lab file"):
        secure_lab(tmp_path / "lab.yaml", tmp_path, None, 5, True)
    assert (tmp_path / "lab.yaml").read_text() == LAB_FILE


def test_builtin_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    """The fallback computes what mosquitto_passwd writes, given its salt (the broker test checks Mosquitto reads it)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret-Pässword"], check=True, capture_output=True)
    user, hashed = path.read_text().strip().split(":", 1)
    _, version, iterations, salt, _digest = hashed.split("$")
    assert (version, iterations) == ("7", "101")
    assert mosquitto_hash("s3cret-Pässword", base64.b64decode(salt), int(iterations)) == hashed
    assert len(base64.b64decode(mosquitto_hash("x").split("$")[3])) == 12


def test_cli_prints_what_it_wrote_and_next_commands(tmp_path: Path) -> None:
    (tmp_path / "lab.yaml").write_text(LAB_FILE)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["lab", "secure", str(tmp_path / "lab.yaml"), "--out", str(out), "--host", "10.1.2.3"]
    )
    assert result.exit_code == 0, result.output
    assert f"secured lab {LAB} in {out.resolve()}" in result.output
    assert f"mosquitto -c {out.resolve() / 'mosquitto.conf'}" in result.output
    assert f"labtwin agent --channel ch2 --lab {out.resolve() / 'lab.yaml'}" in result.output
    for ident in ("viewer", "agent-ch1"):
        assert (out / ident / "password").read_text().strip() not in result.output  # never a secret on screen
    assert yaml.safe_load((out / "lab.yaml").read_text())["broker"] == "mqtts://10.1.2.3:8883"


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.yaml", "--out", "{tmp}/o"], "lab file missing.yaml: does not exist"),
        (["{tmp}/lab.yaml", "--out", "{tmp}/lab.yaml"], "is a file"),
        (["{tmp}/lab.yaml", "--out", "{tmp}/full"], "is not empty"),
        (["{tmp}/lab.yaml", "--out", "{tmp}/o", "--days", "0"], "--days 0"),
        (["{tmp}/lab.yaml", "--out", "{tmp}/ro/o"], "cannot be written"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "lab.yaml").write_text(LAB_FILE)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "ro").write_text("a file, so nothing can be made under it")
    result = CliRunner().invoke(app, ["lab", "secure", *[a.format(tmp=tmp_path) for a in args]])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
