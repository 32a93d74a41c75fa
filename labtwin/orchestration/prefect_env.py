"""The Prefect settings labtwin runs with, applied by whoever starts Prefect, never by an import.

Importing a labtwin module changes nothing in the process's environment: the CLI calls
``use_prefect_defaults`` at start-up, and ``flows.start_prefect_api`` before it starts the API. Each
is a default only: a variable the user (or a test harness) set already is left as it is. Processes
started afterwards (a Prefect Runner's flow-run processes) inherit them from the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from types import MappingProxyType

PREFECT_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # Many flows at once lock the ephemeral server's SQLite and it answers 503; the client backs off 2, 4, 8 s...
        "PREFECT_CLIENT_MAX_RETRIES": "8",
    }
)

EPHEMERAL_API_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        # The ephemeral API's SQLite has one writer. labtwin needs flow and task runs recorded, not the event
        # history or automations, which double the writes per task-run state (bench/campaign.py).
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    }
)

QUIET_LOGGING: Mapping[str, str] = MappingProxyType(
    {"PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_LOGGING_SERVER_LEVEL": "WARNING"}
)


def use_prefect_defaults(environ: MutableMapping[str, str] | None = None, *, quiet_logging: bool = False) -> None:
    """Set labtwin's Prefect defaults in ``environ`` (the process environment unless given), before Prefect
    starts. ``quiet_logging``: Prefect logs warnings only (the CLI prints its own progress)."""
    env = os.environ if environ is None else environ
    wanted = dict(PREFECT_DEFAULTS)
    if not env.get("PREFECT_API_URL"):  # no API server given: Prefect starts its ephemeral one
        wanted.update(EPHEMERAL_API_DEFAULTS)
    if quiet_logging:
        wanted.update(QUIET_LOGGING)
    for name, value in wanted.items():
        env.setdefault(name, value)
