"""The documents that travel on labtwin's bus and land in its store.

Every payload is a versioned pydantic model with a literal ``kind`` so a
subscriber can tell documents apart on one topic and refuse what it does not
understand (a wrong-schema payload is counted and skipped, never crashes).

Sign convention, the same in every file format labtwin reads or writes:
**positive current charges the cell** (PyBaMM uses the opposite sign; any
conversion to or from PyBaMM says so where it happens).

``capacity_Ah`` in a sample is the net charge passed since the start of the
run, with the same sign: it rises while charging and falls while discharging,
so a V-Q curve is a plot of voltage against it and a step's charge is the
difference of its first and last value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION: Final = 1


def utc_now() -> datetime:
    return datetime.now(UTC)


class Document(BaseModel):
    """Base of every bus document: strict about unknown fields so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    v: Literal[1] = SCHEMA_VERSION
