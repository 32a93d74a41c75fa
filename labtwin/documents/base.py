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

import math
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

SCHEMA_VERSION: Final = 1

MAX_PAYLOAD_BYTES: Final = 4 * 1024 * 1024
"""Largest payload labtwin decodes: a full batch (MAX_BATCH_SAMPLES samples of ten columns, about 2 MB) fits,
a 20 MB batch that would put half a million rows in the store in one go does not."""

MAX_BATCH_SAMPLES: Final = 10_000
"""Most samples one SampleBatch may carry; agents send about 100, replays 200."""

INT_MAX: Final = 2**31 - 1
StoreInt = Annotated[int, Field(ge=-INT_MAX - 1, le=INT_MAX)]
"""Every integer a document carries (indices, counts, sequence numbers): the store keeps them as INTEGER, which is
32 bits on PostgreSQL and 64 on SQLite, so one beyond that range would stop the recorder at its insert (issue 14:
a step event with an integer >= 2**63 did). Refused at the document instead, where the bus counts and skips it."""

Count = Annotated[int, Field(ge=0, le=INT_MAX)]
"""A StoreInt that cannot be negative (seq, indices, counts). Its own alias, not ``StoreInt = Field(ge=0)``: pydantic
keeps only the last of two lower bounds, and that one is the alias's."""


def _nan_is_none(value: object) -> object:
    return None if isinstance(value, float) and math.isnan(value) else value


MaybeReading = Annotated[float | None, BeforeValidator(_nan_is_none)]
"""A reading that may be missing (a status's voltage, a step's end voltage): an instrument's NaN, "no reading", is
None here, as it is on the wire, so an agent that read NaN still publishes its status. Infinity is still refused."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Finite(BaseModel):
    """Base of every model a document is made of: no NaN, no infinity (nor 1e400, which JSON parses as one).

    JSON has no NaN: pydantic writes NaN and infinity as null, which the receiver then refuses for a float field, and
    a NaN or infinity that is accepted poisons every consumer after it (sums, fits, limits, the store). A missing
    value is None (temperature without a sensor), never NaN. Sub-models derive from this too: a config does not
    reach a nested model through its parent."""

    model_config = ConfigDict(allow_inf_nan=False)


class Document(Finite):
    """Base of every bus document: strict about unknown fields so typos surface."""

    model_config = ConfigDict(extra="forbid", frozen=False)
    v: Literal[1] = SCHEMA_VERSION
