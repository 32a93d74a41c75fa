"""The topic scheme: labtwin/v1/<lab>/<channel>/{cmd,event,data,status} and .../cells/<cell>/{state,anomaly}."""

from __future__ import annotations

import re

ROOT = "labtwin/v1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(kind: str, name: str) -> str:
    """Lab and channel names become topic levels: no '/', '+', '#' or spaces."""
    if not _NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (it becomes an MQTT topic level)"
        )
    return name


def topic(lab: str, channel: str, kind: str) -> str:
    """The topic of one channel's stream: kind is cmd, event, data or status."""
    if kind not in {"cmd", "event", "data", "status"}:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{ROOT}/{lab}/{channel}/{kind}"


def cell_topic(lab: str, cell: str, kind: str) -> str:
    """The twin's topics for one cell: kind is state (retained) or anomaly."""
    if kind not in {"state", "anomaly"}:
        raise ValueError(f"unknown cell topic kind {kind!r}")
    return f"{ROOT}/{lab}/cells/{cell}/{kind}"
