"""Who is looking: dashboard logins, their roles, sessions that expire, and CSRF-safe actions.

Logins map to the security profile's roles: a ``viewer`` reads, an ``operator`` may also pause, resume and
stop runs (the bus carries the command under the dashboard's operator identity, and the agent still checks
its own limits). Passwords are stored as scrypt hashes (Python's hashlib: memory-hard, in the standard
library, nothing to install); the users file never holds a password. Sessions live in the dashboard's memory:
a restart logs everyone out, which is the safe default for a lab. A state-changing request carries the
session's CSRF token in a header and comes from the dashboard's own origin; the session cookie is HttpOnly
and SameSite=Strict (and Secure under TLS).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Role = Literal["viewer", "operator"]
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
ANONYMOUS = "anonymous"


class UsersFileError(ValueError):
    pass


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role
    password_scrypt: str = Field(description="scrypt$N$r$p$salt_hex$hash_hex, written by `labtwin dashboard-user`")


class UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: dict[str, UserEntry] = Field(default_factory=dict)


def hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt_hex), n=int(n), r=int(r), p=int(p), dklen=len(hash_hex) // 2
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(digest.hex(), hash_hex)


def load_users(path: Path) -> UsersFile:
    """The users file; a file that is not one raises a one-line UsersFileError naming it and the field."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot read ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise UsersFileError(f"{path}: not JSON (line {exc.lineno}): write it with `labtwin dashboard-user`") from None
    try:
        return UsersFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsersFileError(f"{path}: {where}: {first['msg']}") from None


def add_user(path: Path, name: str, role: Role, password: str) -> None:
    """Add or replace a login; the file is written owner-only, as a credential store should be."""
    if not name or any(c.isspace() for c in name) or len(name) > 64:
        raise UsersFileError(f"user name {name!r}: use 1-64 characters without spaces")
    if len(password) < 8:
        raise UsersFileError("password: use at least 8 characters")
    users = load_users(path) if path.exists() else UsersFile()
    users.users[name] = UserEntry(role=role, password_scrypt=hash_password(password))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(users.model_dump_json(indent=2))
    os.replace(tmp, path)


@dataclass
class Session:
    user: str
    role: Role
    csrf: str
    expires_at: float


class Sessions:
    """Logged-in browsers: a random token in a cookie; idle ones expire."""

    def __init__(self, users: UsersFile | None, idle_timeout_s: float = 8 * 3600) -> None:
        self.users = users
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}

    @property
    def logins_required(self) -> bool:
        return self.users is not None

    def login(self, name: str, password: str) -> tuple[str, Session] | None:
        entry = self.users.users.get(name) if self.users else None
        # Hash even for an unknown user, so the time taken does not tell which names exist.
        ok = check_password(password, entry.password_scrypt if entry else hash_password("x", b"0" * 16))
        if entry is None or not ok:
            return None
        token = secrets.token_urlsafe(32)
        session = Session(name, entry.role, secrets.token_urlsafe(24), time.monotonic() + self.idle_timeout_s)
        self._sessions[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        """The session of a cookie, extended as it is used; None when unknown or expired."""
        if not token:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        now = time.monotonic()
        if now > session.expires_at:
            del self._sessions[token]
            return None
        session.expires_at = now + self.idle_timeout_s
        return session

    def logout(self, token: str | None) -> None:
        if token:
            self._sessions.pop(token, None)

    def anonymous(self) -> Session:
        """Without a users file the dashboard is read-only for whoever reaches it (bound to loopback by default)."""
        return Session(ANONYMOUS, "viewer", "", float("inf"))
