"""Downsampling that keeps extremes: a million-sample run drawn from a few thousand points without losing a peak.

A browser draws a line at most once per pixel column, so sending more points than columns only costs time.
Plain decimation (every n-th point) would drop the millivolt ripple of a plateau oscillation and the spikes a
lab looks for, so each bucket sends its first, minimum, maximum and last sample, in time order: the drawn
envelope is the true one at any zoom down to a bucket. Zooming in asks the server again for the visible span.
"""

from __future__ import annotations

import numpy as np


def extremes_indices(values: np.ndarray, buckets: int) -> np.ndarray:
    """Indices of the first, min, max and last sample of each of ``buckets`` equal-count buckets, sorted.

    NaN readings (a reading the instrument did not give) are kept where they are first or last in a bucket and
    never chosen as min or max. Fewer samples than ``4 * buckets``: every index.
    """
    n = len(values)
    if n <= 4 * buckets or buckets < 1:
        return np.arange(n)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    starts, ends = edges[:-1], edges[1:]
    width = int(np.max(ends - starts))
    # Pad every bucket to the same width (with its own last value) so one vectorised argmin/argmax does all.
    offsets = np.arange(width)
    idx = np.minimum(starts[:, None] + offsets[None, :], ends[:, None] - 1)
    block = np.asarray(values, dtype=float)[idx]
    finite = np.isfinite(block)
    low = np.where(finite, block, np.inf).argmin(axis=1)
    high = np.where(finite, block, -np.inf).argmax(axis=1)
    rows = np.arange(buckets)
    chosen = np.concatenate([starts, idx[rows, low], idx[rows, high], ends - 1])
    return np.unique(chosen)


def downsample(columns: dict[str, np.ndarray], key: str, buckets: int, also: tuple[str, ...] = ()) -> np.ndarray:
    """The indices that keep the extremes of ``key`` and of each column in ``also`` (e.g. voltage and current)."""
    picks = [extremes_indices(columns[key], buckets)]
    picks += [extremes_indices(columns[name], buckets) for name in also]
    return np.unique(np.concatenate(picks)) if picks else np.arange(0)
