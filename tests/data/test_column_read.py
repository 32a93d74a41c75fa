"""The Arrow column reader of a SQLite store gives exactly the row reader's columns (its reference)."""

from __future__ import annotations

import numpy as np
import pytest

from labtwin.data import column_read
from labtwin.data.store import Store
from labtwin.documents import RunStart, SampleBatch

pytestmark = pytest.mark.skipif(not column_read.available(), reason="adbc-driver-sqlite is not installed")


def _batch(run_id: str, seq: int, n: int, temperature: float | None) -> SampleBatch:
    t = np.arange(seq * n, (seq + 1) * n, dtype=float)
    return SampleBatch(
        run_id=run_id,
        channel="ch",
        seq=seq,
        time_s=t.tolist(),
        voltage_V=(3.0 + 1e-4 * t).tolist(),
        current_A=[1e-3] * n,
        capacity_Ah=(1e-3 * t / 3600).tolist(),
        # No probe for the first batches (NULL), then a reading: the driver must not type the column integer.
        temperature_C=[temperature] * n,
        step=[seq] * n,
        cycle=[1 + seq // 2] * n,
    )


@pytest.mark.parametrize("n_batches", [0, 3, 40])
def test_columns_equal_the_row_reader(tmp_path, monkeypatch, caplog, n_batches):
    monkeypatch.setattr(column_read, "SPLIT_ABOVE_SAMPLES", 1000)  # 40 batches: read on several threads
    store = Store.open(tmp_path / "s.db")
    try:
        docs: list = [RunStart(run_id="r", lab="lab", channel="ch", cell_id="c", protocol="p", n_steps=1)]
        docs += [_batch("r", seq, 1500, None if seq < 2 else 25.0 + seq) for seq in range(n_batches)]
        docs.append(_batch("other", 0, 10, 20.0))  # another run in the same table is not read
        store.write(docs)
        columns, rows = store.samples("r"), store.sample_rows("r")
        assert "column reader failed" not in caplog.text  # the Arrow path ran, not the fallback to rows
        direct = column_read.read_samples(tmp_path / "s.db", "r", (0, n_batches - 1) if n_batches else None, 0)
        np.testing.assert_array_equal(direct["voltage_V"], rows["voltage_V"])
        assert set(columns) == set(rows)
        for name in rows:
            assert columns[name].dtype == rows[name].dtype, name
            np.testing.assert_array_equal(columns[name], rows[name], err_msg=name)
        assert len(columns["time_s"]) == 1500 * n_batches
        if n_batches:
            assert np.isnan(columns["temperature_C"][0]) and columns["temperature_C"][-1] == 25.0 + n_batches - 1
    finally:
        store.close()
