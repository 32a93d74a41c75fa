"""Lab configuration: which channel is which driver or simulated cell, and each channel's limits.

Real versus simulated is a line of configuration, never a code branch
(QCoDeS' lesson): ``driver: simulated`` with ``cell: <library name>`` or, once
the real drivers land, ``driver: keithley2450`` with ``resource: TCPIP::...``.
Channel limits are the ceiling: a protocol may tighten them, never widen them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labtwin.alerts.config import AlertsConfig
from labtwin.bus import check_name
from labtwin.devices.clock import parse_speed
from labtwin.documents import Limits
from labtwin.protocols.safe_yaml import YamlError, read_yaml_file

DEFAULT_LAB_FILE = Path(__file__).parent / "lab.yaml"
"""The demo lab: what the CLI uses when neither --lab nor LABTWIN_LAB names one (labtwin.config.settings)."""


class LabConfigError(ValueError):
    """A lab file, or a channel asked of it, that cannot work; the message names the file or lab and the fix."""


DRIVERS = ("simulated", "keithley2450", "b2900", "emstat")
"""The drivers a lab file may name. A new driver is added here and to REAL_DRIVERS in labtwin/cli/wiring.py
(a test keeps the two equal), so a typo in `driver:` is refused with the lab file's line, not at run time."""


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    driver: str = Field("simulated", description="'simulated' or a real driver name")
    cell: str | None = Field(None, description="simulated cell: a name in labtwin/physics/cells or a YAML path")
    twin_model: str | None = Field(
        None, description="cell definition the twin runs in the loop for this channel's cell (default: `cell`)"
    )
    cell_id: str | None = Field(None, description="the physical cell's identity (defaults to channel + cell)")
    resource: str | None = Field(None, description="instrument address for real drivers (VISA or serial URL)")
    nominal_capacity_Ah: float | None = Field(
        None,
        gt=0,
        description="real channels: the cell's nominal capacity, for C-rates (simulated cells carry their own)",
    )
    smu_channel: int | None = Field(
        None, ge=1, le=2, description="b2900: which SMU channel of a two-channel B2902A/B2912A"
    )
    timeout_s: float = Field(
        5.0, gt=0, description="real drivers: longest wait for an answer before the instrument counts as lost"
    )
    audit: str | None = Field(
        None,
        description="real drivers: JSON-lines file of every exchange (default ./labtwin-data/audit/<lab>-<channel>.jsonl)",
    )
    speed: float | str | None = Field(
        "max", description="simulated channels: cell s per wall s, or 'max'; real drivers: 1 (or an emulator's --speed)"
    )
    seed: int | None = Field(None, description="random seed of a simulated channel's noise")
    stands_for: str | None = Field(
        None,
        description="simulated channels: the real driver whose instrument this channel stands for (its compliance: "
        "a 2450's voltage limit is a magnitude, so a discharge is not clamped at its cut-off; its fastest reading). "
        "`labtwin dryrun --channel` sets it to that channel's driver",
    )
    limits: Limits = Field(default_factory=Limits)

    @field_validator("driver")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if value not in DRIVERS:
            raise ValueError(f"unknown driver {value!r}: use one of {', '.join(DRIVERS)}")
        return value

    @field_validator("stands_for")
    @classmethod
    def _real_driver(cls, value: str | None) -> str | None:
        if value is not None and (value not in DRIVERS or value == "simulated"):
            real = ", ".join(d for d in DRIVERS if d != "simulated")
            raise ValueError(f"stands_for {value!r}: a simulated channel stands for a real driver, one of {real}")
        return value

    @field_validator("speed")
    @classmethod
    def _speed(cls, value):
        parse_speed(value)
        return value

    @property
    def speed_value(self) -> float | None:
        return parse_speed(self.speed)


class LabConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lab: str = "default"
    broker: str | None = Field(None, description="mqtt://host:port or mqtts://host:8883; None = embedded broker")
    security: Path | None = Field(
        None,
        description="the lab's security profile (labtwin lab secure writes it): identities, TLS, signing keys; "
        "relative to the lab file",
    )
    store: str | None = Field(None, description="SQLite path or postgresql:// URL; None = ./labtwin-data/labtwin.db")
    spool_dir: Path | None = Field(
        None,
        description="where each agent journals its documents before they are sent (a local disk of the instrument "
        "PC, not a network share); None = ./labtwin-data/spool of the agent's working directory",
    )
    channels: dict[str, ChannelConfig] = Field(min_length=1)
    alerts: AlertsConfig | None = Field(
        None, description="rules and destinations of alerts (webhook, e-mail, the dashboard): docs/alerts.md"
    )

    @field_validator("lab")
    @classmethod
    def _lab(cls, value: str) -> str:
        return check_name("lab", value)

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: dict) -> dict:
        for name in value:
            check_name("channel", name)
        return value

    def channel(self, name: str) -> ChannelConfig:
        if name not in self.channels:
            raise LabConfigError(
                f"no channel {name!r} in lab {self.lab!r}: channels are {', '.join(self.channels)} "
                "(--channel, or another lab file: --lab or LABTWIN_LAB)"
            )
        return self.channels[name]


def load_lab(path: str | Path) -> LabConfig:
    """The lab file, or a LabConfigError with one line per mistake, each naming the file and the field.

    Which file is the caller's business: labtwin.config.settings resolves it (--lab, LABTWIN_LAB, ...).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not" if path.is_dir() else "does not exist: give"
        raise LabConfigError(f"lab file {path} {what} a YAML lab file (--lab or LABTWIN_LAB)")
    try:  # the protocols' bounded reader: size, aliases, nesting, duplicate keys, finite numbers (issue 14)
        data = read_yaml_file(path, "a lab file").data
    except YamlError as exc:
        if not exc.syntax:
            raise LabConfigError(str(exc)) from None
        where = f":{exc.line}" if exc.line else ""
        raise LabConfigError(f"{path}{where}: not valid YAML: {exc.problem}") from None
    if not isinstance(data, dict):
        raise LabConfigError(f"{path}: a lab file is a mapping with `lab:` and `channels:`, got {type(data).__name__}")
    try:
        config = LabConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(str(p) for p in e['loc']) or 'lab'}: {e['msg']}" for e in exc.errors()]
        raise LabConfigError("\n".join(lines)) from None
    if config.security is not None and not config.security.expanduser().is_absolute():
        config = config.model_copy(update={"security": path.parent / config.security})
    return config
