"""A stored run exported in each format and read back (``labtwin import``) gives identical samples and cycle
figures; the same file imported twice is stored once; BDF is read in both column styles, gzip and Parquet."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest

from labtwin.analysis.cycles import summarize_cycles
from labtwin.cli.import_files import import_file
from labtwin.data.export import export_samples
from labtwin.data.replay import documents
from labtwin.data.store import Store
from labtwin.formats import RecordingError, read_recording
from labtwin.formats.bdf import EXPORT_QUANTITIES
from labtwin.formats.recording import finish


def _cycling_run():
    """Two CC cycles of a 1 mAh cell at 10 s with a rest, a probe that reads from the second step on."""
    t, v, i, step = [], [], [], []
    clock = 0.0
    for k, (current, n) in enumerate([(0.0, 30), (1e-3, 360), (-1e-3, 350), (1e-3, 355), (-1e-3, 340)]):
        for j in range(n):
            t.append(clock)
            frac = j / n
            v.append(3.0 if current == 0 else (3.5 + 0.6 * frac if current > 0 else 4.1 - 0.6 * frac))
            i.append(current)
            step.append(k)
            clock += 10.0
    temperature = np.where(np.arange(len(t)) < 30, np.nan, 24.0 + 0.01 * np.arange(len(t)))
    return finish("cell", "test", t, v, i, step, temp=temperature)


@pytest.fixture
def stored(tmp_path):
    store = Store.open(tmp_path / "source.db")
    docs = list(documents(_cycling_run(), lab="lab", channel="ch", cell_id="cell-7", run_id="run-1"))
    store.write(docs)
    yield store
    store.close()


def _same(a: dict, b: dict) -> None:
    for name in ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


def _figures(store: Store, run_id: str) -> list[tuple]:
    return [
        (c.cycle, round(c.charge_Ah, 12), round(c.discharge_Ah, 12), c.coulombic_efficiency)
        for c in summarize_cycles(store.step_events(run_id))
    ]


@pytest.mark.parametrize("fmt,suffix", [("bdf", ".bdf"), ("bdf", ".bdf.csv"), ("csv", ".csv"), ("parquet", ".parquet")])
def test_export_then_import_gives_the_same_run(tmp_path, stored, fmt, suffix):
    original = stored.samples("run-1")
    path = export_samples(original, tmp_path / f"run-1{suffix}", fmt)
    target = Store.open(tmp_path / "target.db")
    try:
        first = import_file(target, path, lab="lab", cell="cell-7", nominal_capacity_Ah=1e-3)
        assert first["imported"] and first["samples"] == len(original["time_s"])
        _same(target.samples(first["run_id"]), original)
        assert _figures(target, first["run_id"]) == _figures(stored, "run-1")
        assert [round(f[3], 6) for f in _figures(stored, "run-1")] == [pytest.approx(350 / 360, abs=1e-6)] * 1 + [
            pytest.approx(340 / 355, abs=1e-6)
        ]
        again = import_file(target, path, lab="lab", cell="cell-7", nominal_capacity_Ah=1e-3)
        assert not again["imported"] and again["run_id"] == first["run_id"]
        assert target.sample_count(first["run_id"]) == len(original["time_s"])  # stored once
        start, _ = target.run_documents(first["run_id"])
        assert start is not None and start.metadata["nominal_capacity_Ah"] == "0.001"
    finally:
        target.close()


def _machine_keyed(samples: dict) -> dict:
    return {EXPORT_QUANTITIES[k].key: np.asarray(v) for k, v in samples.items()}


def test_bdf_machine_keys_gzip_and_parquet_read_alike(tmp_path, stored):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    original = stored.samples("run-1")
    table = pa.table(_machine_keyed(original))
    pacsv.write_csv(table, tmp_path / "keys.bdf.csv")
    with (tmp_path / "keys.bdf.csv").open("rb") as src, gzip.open(tmp_path / "keys.bdf.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    pq.write_table(table, tmp_path / "keys.bdf.parquet")
    pq.write_table(table, tmp_path / "keys-by-header.parquet")  # a .parquet whose columns say BDF
    for name in ("keys.bdf.csv", "keys.bdf.csv.gz", "keys.bdf.parquet", "keys-by-header.parquet"):
        rec = read_recording(tmp_path / name)
        assert rec.source_format == "bdf", name
        for column in ("time_s", "voltage_V", "current_A", "capacity_Ah", "step", "cycle"):
            np.testing.assert_array_equal(getattr(rec, column), original[column], err_msg=f"{name} {column}")
        np.testing.assert_array_equal(rec.temperature_C, original["temperature_C"])  # NaN where none was read


def test_bdf_units_are_honoured_and_bad_ones_named(tmp_path):
    path = tmp_path / "units.bdf.csv"
    path.write_text("Test Time / h,Voltage / mV,Current / mA\n0,3500,1\n0.5,3600,1\n1,3700,1\n")
    rec = read_recording(path)
    np.testing.assert_allclose(rec.time_s, [0, 1800, 3600])
    np.testing.assert_allclose(rec.voltage_V, [3.5, 3.6, 3.7])
    np.testing.assert_allclose(rec.current_A, [1e-3] * 3)
    assert rec.capacity_Ah[-1] == pytest.approx(1e-3)  # counted from the current: 1 mA for an hour
    assert rec.notes  # no step column: said how steps were found
    bad = tmp_path / "bad.bdf.csv"
    bad.write_text("Test Time / s,Voltage / furlong,Current / A\n0,1,0\n")
    with pytest.raises(RecordingError, match=r"bad.bdf.csv.*'Voltage / furlong'.*unit 'furlong'"):
        read_recording(bad)
    missing = tmp_path / "missing.bdf.csv"
    missing.write_text("test_time_second,voltage_volt\n0,3.5\n")
    with pytest.raises(RecordingError, match=r"missing.bdf.csv: no 'Current / A' \(or 'current_ampere'\) column"):
        read_recording(missing)
