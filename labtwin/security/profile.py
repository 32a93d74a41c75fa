"""A lab's security profile: every identity on its bus, its role, its credentials and its public key.

``labtwin lab secure`` writes it (``security.yaml``) beside the CA, certificates, password and key
files it makes; the lab file points at it with ``security: <path>``. Public keys sit in the profile
itself, so every machine can verify every sender; private files (password, client key, signing key)
are paths, relative to the profile, and a machine needs only those of the identities it runs.
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SecurityProfileError(ValueError):
    """A profile, or an identity asked of it, that cannot work; the message names the file and the fix."""


class Role(str, Enum):
    """What a process on the bus is for; labtwin.security.policy says what each may publish."""

    agent = "agent"  # one per channel: its channel's data, event and status
    orchestrator = "orchestrator"  # flows and campaigns: any channel's commands
    recorder = "recorder"  # reads everything, publishes nothing
    twin = "twin"  # cell state and anomalies; pause/stop commands from an anomaly policy
    operator = "operator"  # pause, resume, stop by hand
    viewer = "viewer"  # dashboards and monitors: read only


class IdentityEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    channel: str | None = Field(None, description="agents only: the one channel this agent serves")
    username: str = Field(description="the broker user (Mosquitto password file and ACL)")
    password_file: Path | None = Field(None, description="file holding the broker password (one line)")
    cert: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key: Path | None = Field(None, description="client certificate's private key (PEM)")
    signing_key: Path | None = Field(None, description="Ed25519 private key (PEM) this identity signs with")
    public_key: str | None = Field(None, description="Ed25519 public key, raw 32 bytes in base64")

    @model_validator(mode="after")
    def _agent_has_channel(self) -> IdentityEntry:
        if (self.role is Role.agent) != (self.channel is not None):
            raise ValueError("an agent identity names its `channel:`, and only an agent does")
        return self


class SecurityProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lab: str
    broker: str | None = Field(None, description="the lab's broker, e.g. mqtts://broker.lab:8883")
    ca: Path | None = Field(None, description="CA certificate (PEM) the broker's certificate is checked against")
    signing: Literal["required", "off"] = Field(
        "required", description="required: receivers refuse unsigned documents and unknown senders"
    )
    max_clock_skew_s: float = Field(
        300.0, gt=0, description="a command whose nonce time is further than this from the agent's clock is refused"
    )
    identities: dict[str, IdentityEntry] = Field(min_length=1)
    source: Path | None = Field(None, exclude=True, description="the file this profile was read from")

    def identity(self, name: str) -> IdentityEntry:
        if name not in self.identities:
            raise SecurityProfileError(
                f"{self.source or 'security profile'}: no identity {name!r}; it has {', '.join(sorted(self.identities))} "
                "(re-run `labtwin lab secure` after adding a channel)"
            )
        return self.identities[name]

    def agent_of(self, channel: str) -> str | None:
        """The identity name of a channel's agent, or None when the profile has none for it."""
        for name, entry in self.identities.items():
            if entry.role is Role.agent and entry.channel == channel:
                return name
        return None

    @property
    def required(self) -> bool:
        return self.signing == "required"


def agent_identity(channel: str) -> str:
    """The identity name ``labtwin lab secure`` gives a channel's agent."""
    return f"agent-{channel}"


def load_profile(path: str | Path) -> SecurityProfile:
    """The profile at ``path`` with its relative file paths made absolute; read once per file version."""
    p = Path(path).expanduser().resolve()
    try:
        stat = p.stat()
    except OSError:
        raise SecurityProfileError(
            f"security profile {path} does not exist: make one with `labtwin lab secure LABFILE --out DIR`"
        ) from None
    return _load(p, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _load(path: Path, mtime_ns: int, size: int) -> SecurityProfile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SecurityProfileError(f"{path}: not a readable YAML security profile ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise SecurityProfileError(f"{path}: a security profile is a mapping with `lab:` and `identities:`")
    try:
        profile = SecurityProfile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "profile"
        raise SecurityProfileError(f"{path}: {where}: {first['msg']}") from None
    base = path.parent

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else base / p)

    identities = {
        name: entry.model_copy(
            update={
                "password_file": absolute(entry.password_file),
                "cert": absolute(entry.cert),
                "key": absolute(entry.key),
                "signing_key": absolute(entry.signing_key),
            }
        )
        for name, entry in profile.identities.items()
    }
    return profile.model_copy(update={"ca": absolute(profile.ca), "identities": identities, "source": path})
