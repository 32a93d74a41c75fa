"""Prefect's server application as labtwin's local API runs it: one database connection for SQLite (ADR 0019).

This module runs in the API's own process (``uvicorn --factory labtwin.orchestration.prefect_api_server:
create_app``), never in labtwin's. Prefect gives its SQLite engine a pool of connections; every flow-run and
task-run state change is a write, SQLite has one writer, and the others sleep on its lock (busy_timeout) while
the client backs off and retries: 16 cells on the embedded defaults took 240 s for 336 steps (686 ms per
step, the CPU idle; the same steps straight over MQTT: 9.7 s). Prefect already runs an in-memory SQLite
database on one pooled connection; labtwin does the same for a SQLite file, so writes queue in the server
instead of sleeping on the file lock. PostgreSQL keeps Prefect's pool.
"""

from __future__ import annotations

from typing import Any


def _one_connection_for_sqlite() -> None:
    from prefect.server.database import configurations
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    create_engine = configurations.create_async_engine
    if getattr(create_engine, "labtwin_one_connection", False):
        return

    def create_async_engine(url: Any, **kwargs: Any) -> Any:
        if str(url).startswith("sqlite") and "poolclass" not in kwargs:
            kwargs.update(poolclass=AsyncAdaptedQueuePool, pool_size=1, max_overflow=0, pool_recycle=-1)
        return create_engine(url, **kwargs)

    create_async_engine.labtwin_one_connection = True  # type: ignore[attr-defined]
    configurations.create_async_engine = create_async_engine


def create_app() -> Any:
    """Prefect's own application factory (``prefect.server.api.server:create_app``), SQLite on one connection."""
    _one_connection_for_sqlite()
    from prefect.server.api.server import create_app as prefect_create_app

    return prefect_create_app()
