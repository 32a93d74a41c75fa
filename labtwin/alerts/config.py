"""The ``alerts:`` section of a lab file: where alerts go (destinations) and what sends them there (rules).

A model of its own, so the lab file validates it with the rest (labtwin.config.lab holds it as a field and names
the bad field in one line) and so the alert service and ``labtwin alerts test`` read the same thing.

Secrets never sit in the lab file: an SMTP password is read from the environment variable ``password_env``
names, and a webhook URL (Slack's and Teams' carry their token in the path) may be given as ``url_env`` instead
of ``url``. A lab file is copied, committed and mailed around; an environment is not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from labtwin.documents import AnomalyKind
from labtwin.security.connection import is_loopback

DEFAULT_DASHBOARD_URL = "http://127.0.0.1:8050"
"""Where `labtwin dashboard` serves by default; every alert links to ``{dashboard_url}/run/{run_id}``."""

RunEndStatus = Literal["success", "aborted", "failed"]
OncePer = Literal["half_cycle", "cycle", "run"]


def _every_ending() -> list[RunEndStatus]:
    return ["success", "aborted", "failed"]


def _http_url(field: str, value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1]) == 0:
        raise ValueError(f"{field} {value!r} is not an http:// or https:// URL")
    return value


class WebhookDestination(BaseModel):
    """A JSON POST with a ``text`` field (what Slack, Microsoft Teams and Mattermost incoming webhooks show) and
    the alert's fields beside it (lab, channel, cell, run_id, kind, message, link) for receivers that read them."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["webhook"]
    url: str | None = Field(None, description="the incoming webhook's URL")
    url_env: str | None = Field(None, description="or: the environment variable that holds the URL (it is a secret)")
    timeout_s: float = Field(10.0, gt=0, le=120)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url("url", value)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookDestination:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give the webhook either url: or url_env: (the environment variable holding the URL)")
        return self


class EmailDestination(BaseModel):
    """Mail through an SMTP server with STARTTLS (port 587, the submission port). The certificate is checked
    against the system's CAs, or ``ca_file``'s for a lab's own relay."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["email"]
    host: str = Field(min_length=1)
    port: int = Field(587, ge=1, le=65535)
    starttls: bool = Field(True, description="false only for a relay on this machine (127.0.0.1 / localhost)")
    ca_file: Path | None = Field(None, description="PEM CA(s) the server's certificate must chain to")
    username: str | None = None
    password_env: str | None = Field(None, description="the environment variable holding the SMTP password")
    sender: str = Field(min_length=3, description="the From: address")
    to: list[str] = Field(min_length=1, description="recipients")
    timeout_s: float = Field(20.0, gt=0, le=300)

    @model_validator(mode="before")
    @classmethod
    def _no_password(cls, data: object) -> object:
        if isinstance(data, dict) and "password" in data:
            raise ValueError(
                "a password does not belong in the lab file: put it in an environment variable and name the variable "
                "in password_env:"
            )
        return data

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if "@" not in address:
                raise ValueError(f"{address!r} is not an e-mail address")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> EmailDestination:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username: and password_env: go together (a login needs both, none logs in)")
        if not self.starttls and not is_loopback(self.host):
            raise ValueError(
                f"starttls: false would send mail (and a password) to {self.host} in the clear; "
                "only a relay on 127.0.0.1 / localhost may go without it"
            )
        return self


Destination = Annotated[WebhookDestination | EmailDestination, Field(discriminator="type")]


class AlertRule(BaseModel):
    """Which documents alert whom. ``when``: ``anomaly`` (the twin's, filtered by ``kinds``), ``run_end`` (a
    RunStop, filtered by ``exit_status``) or ``safety_trip`` (a step the agent ended on a safety limit).

    De-duplication: a rule fires once per ``once_per`` (anomalies: an oscillation onset once per half cycle, any
    other kind once per run; a run end and a safety trip once per run, however often the document is repeated),
    and at most once per ``min_interval_s`` for one cell; what that holds back is counted into the next alert."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="shown in the alert (default: when + kinds)")
    # Not ``on:``: YAML 1.1 (PyYAML) reads the key ``on`` as the boolean true.
    when: Literal["anomaly", "run_end", "safety_trip"]
    kinds: list[AnomalyKind] | None = Field(None, description="anomaly rules: these kinds only (default: every kind)")
    exit_status: list[RunEndStatus] = Field(
        default_factory=_every_ending, description="run_end rules: these endings only"
    )
    channels: list[str] | None = Field(None, description="only these channels (default: all)")
    to: list[str] | None = Field(
        None, description="destination names (default: every destination); the dashboard gets every alert"
    )
    once_per: OncePer | None = Field(
        None,
        description="anomaly rules: half_cycle, cycle or run (default: half_cycle for oscillation_onset, else run)",
    )
    min_interval_s: float = Field(0.0, ge=0, description="at most one alert of this rule per cell in this time")

    @model_validator(mode="after")
    def _fits(self) -> AlertRule:
        if self.when != "anomaly" and (self.kinds is not None or self.once_per is not None):
            raise ValueError(f"kinds: and once_per: are for `when: anomaly` rules, not `when: {self.when}`")
        if self.when != "run_end" and "exit_status" in self.model_fields_set:
            raise ValueError(f"exit_status: is for `when: run_end` rules, not `when: {self.when}`")
        return self

    @property
    def title(self) -> str:
        if self.name:
            return self.name
        if self.when == "anomaly" and self.kinds:
            return f"anomaly: {', '.join(self.kinds)}"
        return self.when


class AlertsConfig(BaseModel):
    """The lab file's ``alerts:``."""

    model_config = ConfigDict(extra="forbid")

    dashboard_url: str = Field(DEFAULT_DASHBOARD_URL, description="every alert links to {dashboard_url}/run/{run_id}")
    destinations: dict[str, Destination] = Field(default_factory=dict)
    rules: list[AlertRule] = Field(default_factory=list)

    @field_validator("dashboard_url")
    @classmethod
    def _dashboard_url(cls, value: str) -> str:
        return _http_url("dashboard_url", value).rstrip("/")

    @model_validator(mode="after")
    def _known_destinations(self) -> AlertsConfig:
        for i, rule in enumerate(self.rules):
            for name in rule.to or []:
                if name not in self.destinations:
                    known = ", ".join(self.destinations) or "none are configured"
                    raise ValueError(f"rules.{i}.to: no destination {name!r} (destinations: {known})")
        return self

    def destinations_of(self, rule: AlertRule) -> list[str]:
        return list(self.destinations) if rule.to is None else list(rule.to)
