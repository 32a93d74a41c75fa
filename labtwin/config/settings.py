"""What every ``labtwin`` command shares: the lab file, the broker, the store and the speed.

One precedence rule, for every command and every setting, first match wins:

1. the command-line flag (``--lab``, ``--broker``, ``--store``, ``--speed``);
2. the environment variable (``LABTWIN_LAB``, ``LABTWIN_BROKER``, ``LABTWIN_STORE``, ``LABTWIN_SPEED``);
3. the lab file's own line (``broker:``, ``store:``; a channel's ``speed:``), where the lab file is the one
   rungs 1 and 2 named, else the file a command is given names (a campaign's ``lab:``), else the packaged
   demo lab;
4. the built-in default: an embedded broker (commands that can start one) or none, the SQLite file
   ``./labtwin-data/labtwin.db``, and each channel's own speed.

A lab's PC sets ``LABTWIN_LAB`` once and every command then reaches that lab's broker and store, while a
flag still wins for one command. The rule lives here and nowhere else, so no command can read the lab file
and forget the environment (or the other way round); docs/configuration.md says the same for users.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from labtwin.config.lab import DEFAULT_LAB_FILE, LabConfig, load_lab
from labtwin.data.defaults import DEFAULT_SQLITE
from labtwin.devices.clock import parse_speed
from labtwin.security import BrokerConnection


class LabFileSource(PydanticBaseSettingsSource):
    """Rung 3: the ``broker:`` and ``store:`` lines of the lab file the higher rungs chose.

    The file is not read when flags or the environment already gave both; a lab file that does not
    validate is refused (LabConfigError names the file and the field) rather than silently skipped.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # everything is answered at once in __call__

    def __call__(self) -> dict[str, Any]:
        chosen = self.current_state
        if all(name in chosen for name in ("broker", "store", "security")):
            return {}
        config = load_lab(lab_file_of(chosen.get("lab"), chosen.get("fallback_lab")))
        lines = (("broker", config.broker), ("store", config.store), ("security", config.security))
        return {name: value for name, value in lines if value}


def lab_file_of(lab: Path | str | None, fallback_lab: Path | str | None) -> Path:
    return Path(lab or fallback_lab or DEFAULT_LAB_FILE)


class Settings(BaseSettings):
    """The resolved settings of one command; make it with ``Settings.resolve(**flags)``."""

    model_config = SettingsConfigDict(env_prefix="LABTWIN_", env_ignore_empty=True, extra="ignore")

    lab: Path | None = Field(None, description="lab file (LABTWIN_LAB); None: fallback_lab, else the packaged lab")
    fallback_lab: Path | None = Field(
        None, description="the lab file named by the file a command runs (a campaign's `lab:`), below LABTWIN_LAB"
    )
    broker: str | None = Field(
        None, description="mqtt://host:port or mqtts://host:8883 (LABTWIN_BROKER); None: embedded or none"
    )
    security: Path | None = Field(
        None, description="the lab's security profile (LABTWIN_SECURITY, the lab file's security:); None: unsigned"
    )
    store: str = Field(str(DEFAULT_SQLITE), description="SQLite path or postgresql:// URL (LABTWIN_STORE)")
    speed: str | None = Field(None, description="simulated channels: 1 = real time, 1000, or max (LABTWIN_SPEED)")

    _lab_config: LabConfig | None = PrivateAttr(None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets directory: a lab's settings live in its lab file, where the lab can see them.
        return init_settings, env_settings, LabFileSource(settings_cls)

    @classmethod
    def resolve(cls, **flags: Any) -> Settings:
        """The settings for these flags; a flag left out or given as None falls through to the next rung."""
        return cls(**{name: value for name, value in flags.items() if value is not None})

    @field_validator("broker")
    @classmethod
    def _broker(cls, value: str | None) -> str | None:
        if value is not None:
            BrokerConnection.parse(value)  # mqtt:// or mqtts://, with a host: one line naming the URL if not
        return value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value: str | None) -> str | None:
        try:
            parse_speed(value)
        except ValueError as exc:
            raise ValueError(f"--speed / LABTWIN_SPEED: {exc}") from None
        return value

    def connection(self, identity: str | None = None, url: str | None = None) -> BrokerConnection | None:
        """The broker as a reference (URL without its password, the security profile, who this process is);
        None where no broker is set (a command that can starts an embedded one)."""
        url = url or self.broker
        if url is None:
            return None
        # Absolute: the reference travels (a Prefect parameter) to processes started in other directories.
        security = self.security.expanduser().resolve() if self.security is not None else None
        return BrokerConnection.parse(url, security, identity)

    @property
    def lab_file(self) -> Path:
        return lab_file_of(self.lab, self.fallback_lab)

    @property
    def lab_config(self) -> LabConfig:
        """The lab file, read once (it raises LabConfigError naming the file and the field)."""
        if self._lab_config is None:
            self._lab_config = load_lab(self.lab_file)
        return self._lab_config

    @property
    def speed_value(self) -> float | None | str:
        """What the channel builders take: ``"config"`` keeps each channel's own ``speed:``."""
        return "config" if self.speed is None else parse_speed(self.speed)
