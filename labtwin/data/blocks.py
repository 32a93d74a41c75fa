"""Sample blocks: the rows one store write inserted for a run, packed as compressed float64 columns.

Why: reading a run's samples from its rows builds a Python tuple per sample (1.9 s for a million in SQLite, most
of a run page's first render and of ``export``/``analyze`` of a long run). The recorder already holds each batch's
columns when it writes them, so it keeps a copy of them as one block per write, and ``Store.samples`` reads the
blocks (milliseconds) when they add up to the run's batches. The rows stay the record: digests, gap fill and
SQL read them, and a run stored before blocks existed (or whose blocks miss a batch) is read from its rows.
A block carries each sample's (seq, i), so blocks written out of order (a gap filled later) sort into place.
"""

from __future__ import annotations

from itertools import chain

import numpy as np

from labtwin.data.schema import SAMPLE_FIELDS
from labtwin.documents import SampleBatch

# seq, i, then labtwin's sample columns in SAMPLE_FIELDS order
BLOCK_COLUMNS = ("seq", "i", *(name for name, _, _ in SAMPLE_FIELDS))
# LZ4 through pyarrow (already a dependency): 0.05 us a sample to pack, about a quarter of the raw size; zlib at
# its fastest level cost the recorder's write path a fifth of its throughput.
CODEC = "lz4"


def pack(batches: list[SampleBatch]) -> tuple[int, int, int, bytes]:
    """(first_seq, last_seq, n, data) of the batches' samples, in the order given."""
    sizes = [len(b.time_s) for b in batches]
    n = sum(sizes)
    columns = np.empty((len(BLOCK_COLUMNS), n))
    columns[0] = np.repeat([b.seq for b in batches], sizes)
    columns[1] = np.concatenate([np.arange(k) for k in sizes]) if batches else []
    for row, (name, _, _) in enumerate(SAMPLE_FIELDS, start=2):
        # one conversion per column of the whole write; None (no reading) becomes NaN
        columns[row] = np.array(list(chain.from_iterable(getattr(b, name) for b in batches)), dtype=float)
    seqs = [b.seq for b in batches]
    import pyarrow as pa

    return min(seqs), max(seqs), n, pa.compress(columns.tobytes(), codec=CODEC, asbytes=True)


def unpack(blocks: list[tuple[int, bytes]]) -> dict[str, np.ndarray]:
    """The columns of (n, data) blocks, sorted by (seq, i) as the row reader gives them."""
    import pyarrow as pa

    width = len(BLOCK_COLUMNS)
    parts = [
        np.frombuffer(pa.decompress(data, decompressed_size=width * n * 8, codec=CODEC, asbytes=True)).reshape(width, n)
        for n, data in blocks
    ]
    columns = np.concatenate(parts, axis=1) if parts else np.empty((len(BLOCK_COLUMNS), 0))
    seq, i = columns[0], columns[1]
    key = seq * 1e7 + i  # exact: seq and i are integers far below 2**53 / 1e7
    if len(key) > 1 and np.any(np.diff(key) < 0):
        columns = columns[:, np.argsort(key, kind="stable")]
    out = {name: np.ascontiguousarray(columns[row]) for row, (name, _, _) in enumerate(SAMPLE_FIELDS, start=2)}
    out["step"] = out["step"].astype(int)
    out["cycle"] = out["cycle"].astype(int)
    return out
