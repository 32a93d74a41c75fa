"""``labtwin lab secure``: everything one lab needs to run on a Mosquitto with TLS, passwords and per-role ACLs.

One command writes a CA, the broker's certificate, a password, client certificate and Ed25519 signing key per
identity, Mosquitto's password and ACL files and a mosquitto.conf fragment, the security profile that names
them and a copy of the lab file pointing at it. The ACL mirrors labtwin.security.policy (who may publish
where) so the broker is the first wall and the receivers' signature checks the second; both are generated
from the same identity list, so they cannot drift apart. Usernames are ``<lab>-<identity>`` so several labs
share one broker, and nobody may write outside ``labtwin/v1/<lab>/``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from labtwin.bus.broker import write_password_file as write_amqtt_password_file
from labtwin.bus.topics import ROOT
from labtwin.config.lab import LabConfig, LabConfigError, load_lab
from labtwin.security.profile import Role, SecurityProfile, agent_identity
from labtwin.security.signing import new_private_key, private_key_pem, public_key_b64

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_DAYS = 825  # the longest validity Apple's TLS stack accepts for a server certificate
TLS_PORT = 8883
MOSQUITTO_PASSWD = "mosquitto_passwd"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes ($7$101$...)
SALT_BYTES = 12  # mosquitto_passwd 2.0's salt length
SERVICES: tuple[tuple[str, Role], ...] = (
    ("orchestrator", Role.orchestrator),
    ("recorder", Role.recorder),
    ("twin", Role.twin),
    ("operator", Role.operator),
    ("viewer", Role.viewer),
)


class SecureLabError(ValueError):
    """A lab that cannot be secured as asked; the message names the file or option and the fix."""


@dataclass(frozen=True)
class Identity:
    name: str  # in the profile: agent-ch1, orchestrator, ...
    role: Role
    username: str  # on the broker: <lab>-<name>
    channel: str | None = None


@dataclass(frozen=True)
class SecuredLab:
    """What ``secure_lab`` wrote, for the CLI to print and tests to use."""

    out: Path
    lab: str
    broker: str
    identities: tuple[Identity, ...]
    files: tuple[Path, ...]
    passwd_tool: str  # "mosquitto_passwd" or "labtwin" (the built-in $7$ hashing)


# --------------------------------------------------------------------------- identities and ACL


def identities_of(config: LabConfig) -> tuple[Identity, ...]:
    """One agent per channel of the lab file, then the lab's services."""
    agents = [
        Identity(agent_identity(ch), Role.agent, f"{config.lab}-{agent_identity(ch)}", ch) for ch in config.channels
    ]
    return (*agents, *(Identity(name, role, f"{config.lab}-{name}") for name, role in SERVICES))


def acl_rules(lab: str, channels: list[str], identity: Identity) -> list[tuple[str, str]]:
    """(access, topic) pairs, least privilege as labtwin.security.policy; every topic under labtwin/v1/<lab>/.

    Mosquitto 2.0 grants every subscription and checks the read rules on each message it delivers, so the
    twin's ``+`` rules are what its ``+/data`` and ``+/event`` filters bring it, and no more.
    """
    base = f"{ROOT}/{lab}"
    commands = [("write", f"{base}/{ch}/cmd") for ch in channels]
    role = identity.role
    if role is Role.agent:
        ch = identity.channel
        # It reads back its own retained status (labtwin/agent/service.py guards it against a forged one).
        return [
            ("write", f"{base}/{ch}/data"),
            ("write", f"{base}/{ch}/event"),
            ("readwrite", f"{base}/{ch}/status"),
        ] + [("read", f"{base}/{ch}/cmd")]
    # What everyone but the orchestrator reads: never a channel's commands (a captured command is what a
    # replay needs; the agent refuses replays, and this keeps the capture from starting).
    observed = [("read", f"{base}/+/{kind}") for kind in ("data", "event", "status")] + [("read", f"{base}/cells/#")]
    if role is Role.orchestrator:
        return [*commands, ("read", f"{base}/#")]
    if role is Role.operator:
        return [*commands, *observed]
    if role is Role.twin:
        cells = [("write", f"{base}/cells/+/{kind}") for kind in ("state", "anomaly")]
        return [*cells, *commands] + [("read", f"{base}/+/{kind}") for kind in ("data", "event", "status")]
    if role is Role.recorder:  # its one command is a ResendRequest (policy.COMMANDS_OF); it reads no command
        return [*commands, *observed]
    return observed  # viewer


def acl_text(config: LabConfig, identities: tuple[Identity, ...]) -> str:
    lines = [
        f"# Mosquitto ACL for lab {config.lab}, written by `labtwin lab secure`; mirrors labtwin/security/policy.py.",
        "# A user with no line here may do nothing; nobody writes outside " + f"{ROOT}/{config.lab}/.",
    ]
    for ident in identities:
        lines += ["", f"# {ident.name} ({ident.role.value})", f"user {ident.username}"]
        lines += [f"topic {access} {t}" for access, t in acl_rules(config.lab, list(config.channels), ident)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- passwords


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2's password hash ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>``, as mosquitto_passwd writes."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: dict[str, str], tool: str | None = None) -> str:
    """Mosquitto's password file for ``users`` (username: password); returns which hasher wrote it.

    With ``tool`` (a mosquitto_passwd), the plain ``user:password`` lines are written 0600 and hashed in place
    with ``-U``: one process, and no password on a command line where ``ps`` shows it. Without, the same
    format is computed here.
    """
    if tool is None:
        _write_private(path, "".join(f"{u}:{mosquitto_hash(p)}\n" for u, p in users.items()))
        return "labtwin"
    _write_private(path, "".join(f"{u}:{p}\n" for u, p in users.items()))
    try:
        done = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, timeout=60)
        problem = (done.stderr or done.stdout).strip() if done.returncode != 0 else None
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = getattr(exc, "strerror", None) or str(exc)
    if problem is not None:
        path.unlink(missing_ok=True)  # never leave the plain passwords behind
        raise SecureLabError(f"{tool} -U {path} failed ({problem}): fix or uninstall it and run again")
    return Path(tool).name


def find_mosquitto_passwd() -> str | None:
    return shutil.which(MOSQUITTO_PASSWD) or next(
        (p for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd") if os.access(p, os.X_OK)), None
    )


# --------------------------------------------------------------------------- certificates


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "labtwin"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _host_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class _CA:
    """A lab's own CA (ECDSA P-256: small, fast, accepted by Mosquitto's OpenSSL and Python's ssl)."""

    def __init__(self, lab: str, days: int) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # a client clock a little behind
        self.days = days
        self.name = _name(f"labtwin {lab} CA")
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (
            self._builder(self.name, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_usage(cert_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now)
            .not_valid_after(self.now + dt.timedelta(days=self.days))
        )

    def issue(
        self, cn: str, usage: x509.ObjectIdentifier, hosts: list[str] | None = None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            self._builder(_name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(self.aki, critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName(_host_names(hosts)), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def _usage(cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- files


def _write_private(path: Path, data: str | bytes) -> None:
    """A file only its owner reads, 0600 from its first byte (never world-readable for a moment)."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def _write_public(path: Path, data: str | bytes) -> None:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o644)


def broker_url(host: str, port: int = TLS_PORT) -> str:
    return f"mqtts://[{host}]:{port}" if ":" in host.strip("[]") else f"mqtts://{host}:{port}"


def mosquitto_conf(out: Path, lab: str, mtls: bool, port: int = TLS_PORT) -> str:
    """The conf fragment: one TLS listener on 8883, no anonymous clients, the password and ACL files."""
    o = out.resolve()
    return f"""# Mosquitto 2 configuration for lab {lab}, written by `labtwin lab secure` (include it, or copy its lines).
# Paths are absolute: keep this directory where it is, or edit them. Mosquitto started as root drops to
# user mosquitto: that user must be able to read server.key, passwd and acl (chown mosquitto them).
per_listener_settings false
allow_anonymous false
password_file {o / "passwd"}
acl_file {o / "acl"}
# Messages queued per client while it is offline (a persistent session) or slow; Mosquitto's default is 1000.
# An agent's sample batches to a recorder that is down are what fills it: raise it (or set max_queued_bytes)
# if the recorder may be away longer than 1000 batches.
max_queued_messages 1000
# labtwin refuses payloads over 4 MiB (labtwin/documents/base.py); the broker need not carry bigger ones.
max_packet_size 4500000

listener {port}
cafile {o / "ca.crt"}
certfile {o / "server.crt"}
keyfile {o / "server.key"}
tls_version tlsv1.2
require_certificate {"true" if mtls else "false"}
{"use_identity_as_username true" if mtls else "# --mtls: require_certificate true (every client shows its client.crt)"}
"""


def readme(lab: str, broker: str, identities: tuple[Identity, ...], mtls: bool) -> str:
    agents = [i for i in identities if i.role is Role.agent]
    lines = [
        f"What `labtwin lab secure` wrote for lab {lab} (broker {broker}), and which machine needs which file.",
        "Files ending in .key and every password file are secrets (mode 0600): copy them only where listed.",
        "",
        "Broker machine (Mosquitto 2):",
        "  mosquitto.conf  ca.crt  server.crt  server.key  passwd  acl",
        "  start: mosquitto -c mosquitto.conf  (or include it from /etc/mosquitto/conf.d/ and fix the paths)",
        "",
        "Every labtwin machine: ca.crt, security.yaml, lab.yaml (the lab file, pointing at security.yaml),",
        "plus the folder of each identity it runs (password, client.crt, client.key, signing.key):",
    ]
    for ident in agents:
        lines.append(
            f"  agent PC of {ident.channel}: {ident.name}/  (labtwin agent --channel {ident.channel} --lab lab.yaml)"
        )
    lines += [
        "  orchestrator (labtwin run, campaign): orchestrator/",
        "  recorder (labtwin record): recorder/",
        "  twin (labtwin twin): twin/",
        "  operator (pause, resume, stop by hand): operator/",
        "  dashboards and monitors: viewer/",
        "",
        "Without Mosquitto (one PC, a trial): labtwin broker --host 0.0.0.0 --password-file passwd.amqtt takes",
        "these users, but has no TLS and no ACL; use Mosquitto with mosquitto.conf for a lab network.",
        "",
        "Keep ca.key off every machine (it signs new certificates: keep it offline, with this folder's original).",
        "Usernames on the broker are <lab>-<identity>, so several labs can share one broker.",
        f"Client certificates are {'required (--mtls)' if mtls else 'optional (run again with --mtls to require them)'}.",
        "After adding a channel to the lab file, run `labtwin lab secure` again (--force) and redistribute.",
    ]
    return "\n".join(lines) + "\n"


def _read_lab(lab_file: Path) -> tuple[LabConfig, dict[str, Any]]:
    """The lab file checked by load_lab and its raw mapping (copied into lab.yaml with its own keys)."""
    try:
        config = load_lab(lab_file)
    except LabConfigError:
        # A lab file already secured (`security:`) is refused by a LabConfig that does not know the field yet.
        raw = yaml.safe_load(lab_file.read_text(encoding="utf-8"))
        if not (isinstance(raw, dict) and "security" in raw and "security" not in LabConfig.model_fields):
            raise
        try:
            config = LabConfig.model_validate({k: v for k, v in raw.items() if k != "security"})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SecureLabError(
                f"{lab_file}: {'.'.join(str(p) for p in first['loc']) or 'lab'}: {first['msg']}"
            ) from None
        return config, raw
    raw = yaml.safe_load(lab_file.read_text(encoding="utf-8"))
    return config, raw


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SecureLabError(f"--out {out}: is a file; give a new or empty directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SecureLabError(f"--out {out}: is not empty; give a new directory, or --force to overwrite its files")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".labtwin-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SecureLabError(
            f"--out {out}: cannot be written ({exc.strerror or exc}); give a directory you can write"
        ) from None


def secure_lab(
    lab_file: Path,
    out: Path,
    hosts: list[str] | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    mtls: bool = False,
    passwd_tool: str | None | bool = True,
    port: int = TLS_PORT,
) -> SecuredLab:
    """Write everything lab ``lab_file`` needs for a secured Mosquitto into ``out`` (see the module docstring).

    ``passwd_tool``: True finds mosquitto_passwd (the built-in hashing where it is missing), False always uses
    the built-in hashing, a path uses that program.
    """
    lab_file, out = Path(lab_file), Path(out)
    hosts = [h.strip() for h in (hosts or DEFAULT_HOSTS) if h.strip()]
    if not hosts:
        raise SecureLabError("--host: give at least one host name or address the broker is reached at")
    if days < 1:
        raise SecureLabError(f"--days {days}: certificates must be valid for at least one day")
    config, raw = _read_lab(lab_file)
    if (out / "lab.yaml").resolve() == lab_file.resolve():
        raise SecureLabError(
            f"--out {out}: would overwrite the lab file {lab_file} with its copy; give another directory"
        )
    _prepare_out(out, force)
    tool = find_mosquitto_passwd() if passwd_tool is True else (passwd_tool or None)
    identities = identities_of(config)
    broker = broker_url(hosts[0], port)
    written: list[Path] = []

    def put(rel: str, data: str | bytes, private: bool = False) -> None:
        path = out / rel
        (_write_private if private else _write_public)(path, data)
        written.append(path)

    try:
        ca = _CA(config.lab, days)
        put("ca.crt", _pem(ca.cert))
        put("ca.key", _key_pem(ca.key), private=True)
        server, server_key = ca.issue(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, hosts)
        put("server.crt", _pem(server))
        put("server.key", _key_pem(server_key), private=True)

        passwords: dict[str, str] = {}
        profile: dict[str, Any] = {
            "lab": config.lab,
            "broker": broker,
            "ca": "ca.crt",
            "signing": "required",
            "identities": {},
        }
        for ident in identities:
            folder = out / ident.name
            folder.mkdir(exist_ok=True)
            os.chmod(folder, 0o700)
            password = secrets.token_urlsafe(24)
            passwords[ident.username] = password
            put(f"{ident.name}/password", password + "\n", private=True)
            cert, key = ca.issue(ident.username, ExtendedKeyUsageOID.CLIENT_AUTH)
            put(f"{ident.name}/client.crt", _pem(cert))
            put(f"{ident.name}/client.key", _key_pem(key), private=True)
            signing = new_private_key()
            put(f"{ident.name}/signing.key", private_key_pem(signing), private=True)
            entry: dict[str, Any] = {"role": ident.role.value}
            if ident.channel is not None:
                entry["channel"] = ident.channel
            entry |= {
                "username": ident.username,
                "password_file": f"{ident.name}/password",
                "cert": f"{ident.name}/client.crt",
                "key": f"{ident.name}/client.key",
                "signing_key": f"{ident.name}/signing.key",
                "public_key": public_key_b64(signing),
            }
            profile["identities"][ident.name] = entry

        used = write_password_file(out / "passwd", passwords, tool)
        written.append(out / "passwd")
        # The same users for `labtwin broker --host 0.0.0.0 --password-file passwd.amqtt` (amqtt's Argon2 format).
        write_amqtt_password_file(out / "passwd.amqtt", passwords)
        written.append(out / "passwd.amqtt")
        put("acl", acl_text(config, identities), private=True)
        put("mosquitto.conf", mosquitto_conf(out, config.lab, mtls, port))
        SecurityProfile.model_validate(profile)  # what load_profile will read: a mistake here is a bug, caught now
        header = f"# Security profile of lab {config.lab}, written by `labtwin lab secure`; paths are relative to this file.\n"
        put("security.yaml", header + yaml.safe_dump(profile, sort_keys=False, width=200))
        lab_copy = {**raw, "broker": broker, "security": "security.yaml"}
        put(
            "lab.yaml",
            f"# {lab_file.name} secured by `labtwin lab secure`: broker and security point at this folder.\n"
            + yaml.safe_dump(lab_copy, sort_keys=False, width=200),
        )
        put("README.txt", readme(config.lab, broker, identities, mtls))
    except OSError as exc:
        raise SecureLabError(
            f"--out {out}: cannot be written ({exc.strerror or exc}); give a directory you can write"
        ) from None
    return SecuredLab(out, config.lab, broker, identities, tuple(written), used)
