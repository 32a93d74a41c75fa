"""A batch's content digest: what tells a QoS 1 re-delivery from another batch under the same (run_id, seq).

The digest is over the samples as the store keeps them, not over the JSON that
carried them, so it can be recomputed from the stored rows (``Store`` does, for
batches stored before schema 3) and two messages that store the same numbers
have the same digest. Both databases change a few values on the way in: SQLite
stores NaN as NULL and -0.0 as 0.0, so the encoding folds those alike.

Encoding, version 1 (sha256 over the concatenation, hex in ``batches.digest``)::

    b"labtwin.batch.v1\\0"
    n                                   uint64 big-endian, the number of samples
    time_s, voltage_V, current_A,
    capacity_Ah, temperature_C          n float64 big-endian each; None and NaN -> 0x7ff8000000000000,
                                        -0.0 -> 0.0
    step, cycle                         n int64 big-endian each
    b"\\1" + frequency_Hz, z_real_ohm,
      z_imag_ohm (floats as above; a
      missing z column is all None)     when the batch has impedance points and n > 0; else b"\\0"
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

from labtwin.documents import SampleBatch

__all__ = ["FLOAT_COLUMNS", "INT_COLUMNS", "IMPEDANCE_COLUMNS", "batch_digest", "samples_digest"]

_PREFIX = b"labtwin.batch.v1\0"
FLOAT_COLUMNS = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C")
INT_COLUMNS = ("step", "cycle")
IMPEDANCE_COLUMNS = ("frequency_Hz", "z_real_ohm", "z_imag_ohm")

Values = Sequence[float | int | None]
_NAN = float("nan")
_NEGATIVE_ZERO = struct.pack(">d", -0.0)


def _floats(columns: Sequence[Values]) -> bytes:
    """Columns of floats, one after the other, as float64 big-endian.

    The recorder digests every batch, so the common case (no None, NaN or -0.0) is one ``struct.pack`` and two
    checks in C; numpy folds the rest. Both checks may see what is not there (inf - inf sums to NaN, the bytes of
    -0.0 may straddle two values): then numpy looks, and folds only what is there."""
    flat: list[Any] = list(chain.from_iterable(columns))
    total: float
    try:
        packed = struct.pack(f">{len(flat)}d", *flat)
        total = sum(flat)  # NaN when one is
    except struct.error:  # a None: a sample without temperature, a missing impedance part
        packed = struct.pack(f">{len(flat)}d", *(_NAN if v is None else v for v in flat))
        total = _NAN
    if total == total and _NEGATIVE_ZERO not in packed:
        return packed
    a = np.frombuffer(packed, dtype=">f8").copy()
    a[np.isnan(a)] = np.nan  # one NaN bit pattern, whatever payload came in
    a[(a == 0.0) & np.signbit(a)] = 0.0
    return a.tobytes()


def _ints(columns: Sequence[Values]) -> bytes:
    flat = list(chain.from_iterable(columns))
    return struct.pack(f">{len(flat)}q", *flat)


def samples_digest(
    columns: Mapping[str, Values], impedance: tuple[Values, Values, Values] | None, n: int | None = None
) -> str:
    """The digest of ``n`` samples given as columns named as in ``SampleBatch`` (and its impedance, or None)."""
    if n is None:
        n = len(columns["time_s"])
    h = hashlib.sha256(_PREFIX)
    h.update(struct.pack(">Q", n))
    h.update(_floats([columns[name] for name in FLOAT_COLUMNS]))
    h.update(_ints([columns[name] for name in INT_COLUMNS]))
    if impedance is not None and n > 0:
        h.update(b"\1")
        h.update(_floats(impedance))
    else:
        h.update(b"\0")
    return h.hexdigest()


def batch_digest(batch: SampleBatch) -> str:
    """The digest of a batch's samples as the store writes them."""
    n = len(batch.time_s)
    columns = {name: getattr(batch, name) for name in (*FLOAT_COLUMNS, *INT_COLUMNS)}
    impedance = None
    if batch.frequency_Hz is not None:
        missing = [None] * n
        impedance = (batch.frequency_Hz, batch.z_real_ohm or missing, batch.z_imag_ohm or missing)
    return samples_digest(columns, impedance, n)
