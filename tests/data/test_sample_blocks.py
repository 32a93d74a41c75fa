"""A run's sample blocks read back exactly the rows the store holds (the rows are the record), whatever order
its batches came in, with re-deliveries and conflicts; a run whose blocks miss a batch is read from its rows."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import delete

from labtwin.data.schema import sample_blocks
from labtwin.data.store import Store
from labtwin.documents import RunStart, SampleBatch


def _batch(run_id: str, seq: int, n: int = 50, shift: float = 0.0, probe: bool = True) -> SampleBatch:
    t = np.arange(seq * n, (seq + 1) * n, dtype=float)
    return SampleBatch(
        run_id=run_id,
        channel="ch",
        seq=seq,
        time_s=t.tolist(),
        voltage_V=(3.0 + 1e-4 * t + shift).tolist(),
        current_A=[1e-3 if seq % 2 == 0 else -1e-3] * n,
        capacity_Ah=(1e-3 * t / 3600).tolist(),
        temperature_C=[25.0 + 0.01 * seq] * n if probe else [None] * n,
        step=[seq] * n,
        cycle=[1 + seq // 2] * n,
    )


def _same(store: Store, run_id: str) -> dict:
    got, rows = store.samples(run_id), store.sample_rows(run_id)
    assert set(got) == set(rows)
    for name in rows:
        assert got[name].dtype == rows[name].dtype, name
        np.testing.assert_array_equal(got[name], rows[name], err_msg=name)
    return got


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else tmp_path / "s.db"
    s = Store.open(url)
    yield s
    s.close()


def test_blocks_read_the_rows_in_order_whatever_order_the_batches_came(store):
    start = RunStart(run_id="r", lab="lab", channel="ch", cell_id="c", protocol="p", n_steps=10)
    store.write([start, *[_batch("r", k, probe=k >= 2) for k in (0, 1, 2, 5, 6)]])
    store.write([_batch("r", 3), _batch("r", 4), _batch("other", 0)])  # a gap filled after later batches
    store.write([_batch("r", 5)])  # a QoS 1 re-delivery: stored once
    store.write([_batch("r", 6, shift=0.5)])  # a conflicting batch: the stored one stays
    got = _same(store, "r")
    assert len(got["time_s"]) == 7 * 50 and np.all(np.diff(got["time_s"]) > 0)
    assert np.isnan(got["temperature_C"][0]) and got["temperature_C"][-1] == pytest.approx(25.06)
    with store.engine.connect() as conn:
        assert conn.execute(sample_blocks.select().where(sample_blocks.c.run_id == "r")).all()  # blocks were read


def test_a_run_whose_blocks_miss_a_batch_is_read_from_its_rows(store):
    store.write([_batch("old", k) for k in range(4)])
    with store.engine.begin() as conn:  # as a store written before schema 6 holds it: rows, no blocks
        conn.execute(delete(sample_blocks).where(sample_blocks.c.run_id == "old"))
    store.write([_batch("old", 4)])  # one block now, for one batch of five
    got = _same(store, "old")
    assert len(got["time_s"]) == 250


def test_an_empty_run_reads_empty_columns(store):
    got = store.samples("nothing")
    assert all(len(v) == 0 for v in got.values()) and got["step"].dtype == int
