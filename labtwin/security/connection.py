"""How a process reaches the lab's broker: address, TLS, credentials and its signing identity.

A ``BrokerConnection`` is a *reference*: the URL without its password, the security profile's path and
the identity name. It is what travels as a Prefect parameter and what a component is handed; the
secrets (password, client key, signing key) are resolved by ``resolve_transport`` where the connection
is opened, on the machine that holds them. A password typed into a URL is kept on the object but
excluded from every dump, so it reaches the broker and never Prefect's database or a log line.

Precedence, as for every labtwin setting (docs/configuration.md): the URL's own user and password,
then ``LABTWIN_BROKER_USERNAME`` / ``LABTWIN_BROKER_PASSWORD`` (or ``LABTWIN_BROKER_PASSWORD_FILE``),
then the identity's entries in the security profile; TLS files from ``LABTWIN_TLS_CA`` /
``LABTWIN_TLS_CERT`` / ``LABTWIN_TLS_KEY``, then the profile.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from labtwin.security.policy import Verifier
from labtwin.security.profile import Role, SecurityProfile, SecurityProfileError, load_profile
from labtwin.security.redact import redact_url
from labtwin.security.signing import Signer

DEFAULT_USERNAME = "labtwin"  # the embedded broker wants a username (amqtt drops anonymous sessions' queues)
SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


class BrokerConnection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="mqtt://host:port or mqtts://host:port, with a user but never a password")
    password: SecretStr | None = Field(None, exclude=True, description="a password given in the URL; never dumped")
    security: Path | None = Field(None, description="the lab's security profile (labtwin lab secure)")
    identity: str | None = Field(None, description="who this process is in the profile, e.g. agent-ch1")

    @classmethod
    def parse(
        cls, url: str | BrokerConnection, security: Path | str | None = None, identity: str | None = None
    ) -> BrokerConnection:
        """A connection from a URL (its password moved out of it); an existing one is returned as it is."""
        if isinstance(url, BrokerConnection):
            return url
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in SCHEMES:
            raise ValueError(
                f"broker URL {redact_url(url)!r}: scheme must be mqtt:// or mqtts:// (e.g. mqtts://broker.lab:8883)"
            )
        if not parts.hostname:
            raise ValueError(f"broker URL {redact_url(url)!r} has no host (e.g. mqtt://127.0.0.1:1883)")
        try:
            port = parts.port or SCHEMES[parts.scheme]
        except ValueError:
            raise ValueError(
                f"broker URL {redact_url(url)!r}: the port is not a number (a password with '/', ':' or '@' must be "
                "percent-encoded, e.g. %2F; better, leave it out and set LABTWIN_BROKER_PASSWORD)"
            ) from None
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        user = f"{quote(unquote(parts.username), safe='')}@" if parts.username else ""
        scheme = "mqtts" if parts.scheme in {"mqtts", "ssl"} else "mqtt"
        password = SecretStr(unquote(parts.password)) if parts.password else None
        return cls(
            url=f"{scheme}://{user}{host}:{port}",
            password=password,
            security=Path(security) if security else None,
            identity=identity,
        )

    @property
    def tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or SCHEMES["mqtts" if self.tls else "mqtt"]

    @property
    def username(self) -> str | None:
        user = urlsplit(self.url).username
        return unquote(user) if user else None

    def __str__(self) -> str:
        return self.url

    def profile(self) -> SecurityProfile | None:
        return load_profile(self.security) if self.security else None


def as_identity(broker: str | BrokerConnection, identity: str) -> BrokerConnection:
    """The same connection for another identity of the profile (each component knows its own)."""
    return BrokerConnection.parse(broker).model_copy(update={"identity": identity})


@dataclass(frozen=True)
class Transport:
    """Everything a client needs to open the connection; holds secrets, so it is never logged."""

    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)
    tls_context: ssl.SSLContext | None
    signer: Signer | None
    verifier: Verifier | None
    identity: str | None


def is_loopback(host: str) -> bool:
    """A host name or address (IPv6 with or without brackets) that only this machine reaches."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise SecurityProfileError(
            f"{what} {path} cannot be read on this machine ({exc.strerror}): copy it from `labtwin lab secure`'s "
            "output, or set LABTWIN_BROKER_PASSWORD"
        ) from None


def resolve_transport(connection: str | BrokerConnection) -> Transport:
    """Resolve the secrets of a connection here, by the precedence in the module docstring."""
    conn = BrokerConnection.parse(connection)
    profile = conn.profile()
    entry = profile.identity(conn.identity) if profile and conn.identity else None

    # A user named by the URL or the environment brings its password from there too: it is never paired with
    # the profile identity's password (that is another user's).
    named = conn.username or _env("LABTWIN_BROKER_USERNAME")
    username = named or (entry.username if entry else None)
    password: str | None = conn.password.get_secret_value() if conn.password else None
    if password is None:
        password = _env("LABTWIN_BROKER_PASSWORD")
    if password is None and (file := _env("LABTWIN_BROKER_PASSWORD_FILE")):
        password = _read_secret(Path(file), "LABTWIN_BROKER_PASSWORD_FILE")
    if password is None and not named and entry is not None and entry.password_file is not None:
        # A secured broker needs it; the embedded loopback broker takes any password, so a machine without
        # the file still runs a dry-run against it.
        if entry.password_file.exists() or conn.tls:
            password = _read_secret(entry.password_file, f"identity {conn.identity}'s password file")

    if password is not None and not conn.tls and not is_loopback(conn.host) and not _env("LABTWIN_INSECURE_BROKER"):
        raise SecurityProfileError(
            f"broker {conn}: a password would cross the network in clear over mqtt://: use mqtts:// (labtwin lab "
            "secure writes the TLS files), or set LABTWIN_INSECURE_BROKER=1 on a network you trust"
        )
    context = None
    if conn.tls:
        ca = _env("LABTWIN_TLS_CA") or (profile.ca if profile else None)
        cert = _env("LABTWIN_TLS_CERT") or (entry.cert if entry else None)
        key = _env("LABTWIN_TLS_KEY") or (entry.key if entry else None)
        context = tls_context(ca, cert, key)

    signer = None
    verifier = None
    if profile is not None:
        verifier = Verifier(profile)
        publishes = entry is not None and entry.role not in (Role.viewer, Role.recorder)
        if entry is not None and entry.signing_key is not None:
            try:
                signer = Signer.from_file(conn.identity or "", entry.signing_key)
            except ValueError as exc:
                if publishes and profile.required:
                    raise SecurityProfileError(
                        f"{exc}: identity {conn.identity} cannot sign on this machine, and lab {profile.lab} "
                        "refuses unsigned documents (copy its signing key here)"
                    ) from None
        elif publishes and profile.required:
            raise SecurityProfileError(
                f"{profile.source}: identity {conn.identity} has no signing_key, and lab {profile.lab} refuses "
                "unsigned documents (re-run `labtwin lab secure`)"
            )
    return Transport(
        host=conn.host,
        port=conn.port,
        username=username or DEFAULT_USERNAME,
        password=password,
        tls_context=context,
        signer=signer,
        verifier=verifier,
        identity=conn.identity,
    )


def tls_context(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext:
    """Server certificate and name checked (against ``ca``, else the system's CAs); a client certificate if given."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise SecurityProfileError(
            f"TLS CA file {ca} cannot be loaded ({exc}): LABTWIN_TLS_CA or the profile's ca:"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert or key:
        if not (cert and key):
            raise SecurityProfileError(
                "a client certificate needs both LABTWIN_TLS_CERT and LABTWIN_TLS_KEY (or cert: and key:)"
            )
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise SecurityProfileError(f"client certificate {cert} / key {key} cannot be loaded ({exc})") from None
    return context
