"""Real Neware (.nda, .ndax) and BioLogic EC-Lab (.mpr: GCPL without a current column, MB, OCV) files read into
labtwin: rows, columns and units against the reader library's own output, loaded here; per-cycle charge,
discharge and CE against references computed here from the files' raw columns (their own per-step or
per-half-cycle capacity columns, and the trapezoid of the current over time); `labtwin import` of each, once.

The files and where they come from: tests/data/README.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from labtwin.analysis.cycles import CycleSummary, summarize_cycles
from labtwin.cli import app
from labtwin.data.replay import documents
from labtwin.data.store import Store
from labtwin.documents import StepEvent
from labtwin.formats import Recording, RecordingError, read_recording

NewareNDA = pytest.importorskip("NewareNDA")
BioLogic = pytest.importorskip("galvani.BioLogic")

DATA = Path(__file__).resolve().parent / "data"
NDA = DATA / "neware" / "test.nda"
NDAX = DATA / "neware" / "test.ndax"
GCPL = DATA / "biologic" / "jdb11-1_c3_gcpl_5cycles_2V-3p8V_C-24_data_C09.mpr"
MB = DATA / "biologic" / "00_test_04_MB_C01.mpr"
OCV = DATA / "biologic" / "00_test_01_OCV_C01.mpr"
runner = CliRunner()

# A reference cycle: (cycle, charge_Ah, discharge_Ah, CE or None).
Figures = list[tuple[int, float, float, float | None]]


def labtwin_cycles(rec: Recording) -> list[CycleSummary]:
    events = [
        d for d in documents(rec, lab="lab", channel="ch", cell_id="cell", run_id="r") if isinstance(d, StepEvent)
    ]
    return summarize_cycles(events)


def reference_ce(charge_Ah: float, discharge_Ah: float, first: str) -> float | None:
    """labtwin's documented CE (labtwin.analysis.cycles): the second direction's charge over the first's, the first
    being that of the run's first step that moved a substantial charge; none unless the cycle went both ways."""
    if charge_Ah <= 0 or discharge_Ah <= 0:
        return None
    return charge_Ah / discharge_Ah if first == "discharge" else discharge_Ah / charge_Ah


def assert_figures(got: list[CycleSummary], want: Figures, rel: float) -> float:
    """labtwin's cycles equal the reference's; the largest relative difference of a capacity."""
    assert [c.cycle for c in got] == [w[0] for w in want]
    worst = 0.0
    for c, (_, charge, discharge, ce) in zip(got, want):
        assert c.charge_Ah == pytest.approx(charge, rel=rel, abs=1e-15), c.cycle
        assert c.discharge_Ah == pytest.approx(discharge, rel=rel, abs=1e-15), c.cycle
        for a, b in ((c.charge_Ah, charge), (c.discharge_Ah, discharge)):
            worst = max(worst, abs(a - b) / b if b else abs(a - b))
        if ce is None:
            assert c.coulombic_efficiency is None, c.cycle
        else:
            assert c.coulombic_efficiency == pytest.approx(ce, rel=rel), c.cycle
    return worst


# --- Neware ----------------------------------------------------------------------------------------------------


def neware_raw(path: Path):
    return NewareNDA.read(str(path), software_cycle_number=True, cycle_mode="auto", log_level="WARNING")


def neware_reference(raw) -> Figures:
    """Per cycle: the sums of each step's last Charge_Capacity and Discharge_Capacity (they reset every step)."""
    last = raw.groupby("Step", sort=True).agg(
        cycle=("Cycle", "first"),
        status=("Status", "first"),
        charge=("Charge_Capacity(mAh)", "last"),
        discharge=("Discharge_Capacity(mAh)", "last"),
    )
    driving = last[(last.charge > 0) | (last.discharge > 0)]
    # The documented CE convention: the first moving step's direction if it moved a substantial charge (half
    # the largest step's), else charge first.
    moved = (driving.charge + driving.discharge).to_numpy()
    opening = "discharge" if "DChg" in str(driving.status.iloc[0]) else "charge"
    first = opening if moved[0] >= 0.5 * moved.max() else "charge"
    per_cycle = last.groupby("cycle").agg(charge=("charge", "sum"), discharge=("discharge", "sum"))
    out: Figures = []
    for cycle, row in per_cycle.iterrows():
        charge, discharge = float(row.charge) / 1e3, float(row.discharge) / 1e3
        out.append((int(cycle), charge, discharge, reference_ce(charge, discharge, first)))
    return out


def trapezoid_Ah(time_s: np.ndarray, current_A: np.ndarray) -> float:
    return float(np.sum(0.5 * (current_A[1:] + current_A[:-1]) * np.diff(time_s)) / 3600.0)


def trapezoid_per_step_Ah(time_s: np.ndarray, current_A: np.ndarray, step: np.ndarray) -> dict[int, float]:
    return {int(s): trapezoid_Ah(time_s[step == s], current_A[step == s]) for s in np.unique(step)}


@pytest.mark.parametrize(("path", "rows", "cycles"), [(NDA, 439, [1, 2]), (NDAX, 1464, [1])])
def test_neware_file_reads_as_the_library_does_with_labtwins_units_and_signs(path, rows, cycles):
    raw = neware_raw(path)
    rec = read_recording(path)
    assert len(rec) == len(raw) == rows
    assert rec.source_format == "neware-" + path.suffix.lstrip(".")
    np.testing.assert_array_equal(rec.voltage_V, raw["Voltage"].to_numpy(float))
    # NewareNDA gives mA, negative on discharge: labtwin's sign, in A.
    np.testing.assert_allclose(rec.current_A, raw["Current(mA)"].to_numpy(float) / 1e3, rtol=0, atol=0)
    status = raw["Status"].astype(str).to_numpy()
    assert np.all(rec.current_A[np.char.find(status.astype(str), "DChg") >= 0] <= 0)
    assert np.all(rec.current_A[np.char.endswith(status.astype(str), "_Chg")] >= 0)
    assert np.all(rec.current_A[status == "Rest"] == 0)
    # Time since the start, rebuilt from the step times, agrees with the file's own clock (1 s resolution).
    stamp_s = (raw["Timestamp"] - raw["Timestamp"].iloc[0]).dt.total_seconds().to_numpy()
    assert np.all(np.diff(rec.time_s) >= 0)
    assert np.max(np.abs(rec.time_s - stamp_s)) <= 1.0
    assert rec.unix_start_s is not None
    # One labtwin step per change of the file's step; its cycles as NewareNDA numbers them.
    assert int(rec.step.max()) + 1 == raw["Step"].nunique()
    np.testing.assert_array_equal(rec.cycle, raw["Cycle"].to_numpy(int))
    assert sorted(set(rec.cycle.tolist())) == cycles
    # Net charge: each step's charge minus discharge, carried over the steps before it.
    assert rec.capacity_Ah[0] == 0.0
    ref = neware_reference(raw)
    net = sum(charge - discharge for _, charge, discharge, _ in ref)
    assert rec.capacity_Ah[-1] == pytest.approx(net, rel=1e-9)
    assert np.all(np.isnan(rec.temperature_C))  # neither file has an auxiliary thermocouple


@pytest.mark.parametrize("path", [NDA, NDAX])
def test_neware_cycles_match_the_files_own_step_capacities(path):
    raw = neware_raw(path)
    rec = read_recording(path)
    worst = assert_figures(labtwin_cycles(rec), neware_reference(raw), rel=1e-6)
    assert worst < 1e-6
    # The current's unit, independently: its trapezoid over each step's time moves each step's capacity.
    steps = trapezoid_per_step_Ah(rec.time_s, rec.current_A, rec.step)
    last = raw.groupby("Step", sort=True)[["Charge_Capacity(mAh)", "Discharge_Capacity(mAh)"]].last().to_numpy()
    for k, (charge_mAh, discharge_mAh) in enumerate(last):
        moved_Ah = (charge_mAh - discharge_mAh) / 1e3
        if abs(moved_Ah) > 0:
            assert steps[k] == pytest.approx(moved_Ah, rel=0.03), k


def test_neware_nda_cycle_figures():
    """test.nda: discharge, rest, charge, rest, discharge, rest. Cycles open with each discharge (the file's first
    direction), so cycle 1 is the first discharge and the charge, cycle 2 the second discharge alone. The first
    discharge is 1 % of the largest step's charge, too little to call the cell an anode: CE reads charge first."""
    got = labtwin_cycles(read_recording(NDA))
    assert [c.cycle for c in got] == [1, 2]
    assert got[0].first_direction == "charge"
    assert got[0].coulombic_efficiency is not None and got[1].coulombic_efficiency is None


def test_neware_ndax_cycle_figures():
    """test.ndax: one CC-CV charge then one CC-CV discharge, 0.593 and 0.625 mAh (CE 1.055)."""
    (cycle,) = labtwin_cycles(read_recording(NDAX))
    assert cycle.charge_Ah == pytest.approx(0.593039e-3, rel=1e-5)
    assert cycle.discharge_Ah == pytest.approx(0.625451e-3, rel=1e-5)
    assert cycle.coulombic_efficiency == pytest.approx(0.625451 / 0.593039, rel=1e-5)


# --- BioLogic --------------------------------------------------------------------------------------------------


def mpr_raw(path: Path) -> np.ndarray:
    return BioLogic.MPRfile(str(path)).data


def halfcycle_reference(data: np.ndarray) -> Figures:
    """Per cycle from EC-Lab's own per-half-cycle count: the last ``Q charge/discharge/mA.h`` of each half cycle
    (it restarts every half cycle; positive charge, negative discharge), two half cycles to a cycle."""
    hc = np.asarray(data["half cycle"], dtype=int)
    q = np.asarray(data["Q charge/discharge/mA.h"], dtype=float)
    ends = np.flatnonzero(np.concatenate([hc[1:] != hc[:-1], [True]]))
    moved = {int(hc[e]): float(q[e]) / 1e3 for e in ends}
    # The CE convention is the direction of the first half cycle that moved a substantial charge (at least half
    # the largest): this file opens with a cathode's partial discharge from rest, so CE = discharge / charge, as
    # the peer tools read it.
    ordered = [moved[h] for h in sorted(moved) if moved[h] != 0]
    largest = max(abs(m) for m in ordered)
    opening = next(m for m in ordered if abs(m) >= 0.5 * largest)
    first = "charge" if opening > 0 else "discharge"
    out: Figures = []
    for cycle in sorted({h // 2 + 1 for h in moved}):
        halves = [m for h, m in moved.items() if h // 2 + 1 == cycle]
        charge = sum(m for m in halves if m > 0)
        discharge = -sum(m for m in halves if m < 0)
        out.append((cycle, charge, discharge, reference_ce(charge, discharge, first)))
    return out


def trapezoid_per_halfcycle_Ah(data: np.ndarray, current_mA: np.ndarray) -> dict[int, float]:
    t = np.asarray(data["time/s"], dtype=float)
    hc = np.asarray(data["half cycle"], dtype=int)
    return {int(h): trapezoid_Ah(t[hc == h], current_mA[hc == h] / 1e3) for h in np.unique(hc)}


def test_gcpl_without_a_current_column_reads_its_set_point_and_zero_at_rest():
    data = mpr_raw(GCPL)
    names = set(data.dtype.names)
    assert {"control/V/mA", "dq/mA.h", "(Q-Qo)/mA.h", "half cycle", "Ns"} <= names and "I/mA" not in names
    rec = read_recording(GCPL)
    assert len(rec) == len(data) == 46102
    np.testing.assert_array_equal(rec.time_s, data["time/s"])
    np.testing.assert_array_equal(rec.voltage_V, data["Ewe/V"])
    np.testing.assert_allclose(rec.capacity_Ah, data["(Q-Qo)/mA.h"] / 1e3, rtol=0, atol=0)
    mode = data["flags"] & 0x03
    galvanostatic, rest = mode == 1, mode == 3
    assert galvanostatic.sum() + rest.sum() == len(data)
    np.testing.assert_array_equal(rec.current_A[galvanostatic], data["control/V/mA"][galvanostatic].astype(float) / 1e3)
    assert np.all(rec.current_A[rest] == 0) and np.any(data["control/V/mA"][rest] != 0)
    # The set point is the current the instrument measured moving charge: dQ/dt per row agrees to 0.1 %.
    dt = np.diff(data["time/s"], prepend=data["time/s"][0])
    ok = galvanostatic & (dt > 1.0)
    measured_mA = data["dq/mA.h"][ok] * 3600.0 / dt[ok]
    np.testing.assert_allclose(rec.current_A[ok] * 1e3, measured_mA, rtol=1e-3)
    assert any("control/V/mA" in n for n in rec.notes)
    # Steps: Ns and half cycle together; cycles: two half cycles each.
    assert int(rec.step.max()) + 1 == 14
    np.testing.assert_array_equal(rec.cycle, data["half cycle"] // 2 + 1)


def test_gcpl_cycles_match_the_files_half_cycle_capacities_and_the_integrated_current():
    data = mpr_raw(GCPL)
    rec = read_recording(GCPL)
    want = halfcycle_reference(data)
    assert len(want) == 7
    worst = assert_figures(labtwin_cycles(rec), want, rel=1e-6)
    assert worst < 1e-6
    # Independently of every capacity column: the trapezoid of the set-point current over each half cycle.
    trapezoid = trapezoid_per_halfcycle_Ah(data, rec.current_A * 1e3)
    hc = np.asarray(data["half cycle"], dtype=int)
    q = np.asarray(data["Q charge/discharge/mA.h"], dtype=float)
    for h, moved_Ah in trapezoid.items():
        file_Ah = q[np.flatnonzero(hc == h)[-1]] / 1e3
        assert moved_Ah == pytest.approx(file_Ah, rel=1e-3), h


def test_mb_file_reads_its_measured_current():
    data = mpr_raw(MB)
    assert {"I/mA", "control/V", "(Q-Qo)/mA.h", "half cycle"} <= set(data.dtype.names)
    rec = read_recording(MB)
    assert len(rec) == len(data) == 1501
    np.testing.assert_array_equal(rec.current_A, data["I/mA"].astype(float) / 1e3)
    np.testing.assert_array_equal(rec.voltage_V, data["Ewe/V"])
    assert not rec.notes or all("current" not in n for n in rec.notes)  # measured: nothing derived
    want = halfcycle_reference(data)
    assert [w[0] for w in want] == [1] and want[0][1] == 0.0 and want[0][3] is None
    assert_figures(labtwin_cycles(rec), want, rel=1e-6)
    (moved_Ah,) = trapezoid_per_halfcycle_Ah(data, data["I/mA"].astype(float)).values()
    assert moved_Ah == pytest.approx(-want[0][2], rel=0.01)


def test_ocv_file_has_zero_current_and_no_cycles():
    data = mpr_raw(OCV)
    assert list(data.dtype.names) == ["flags", "time/s", "Ewe/V"]
    rec = read_recording(OCV)
    assert len(rec) == 2
    np.testing.assert_array_equal(rec.voltage_V, data["Ewe/V"])
    assert np.all(rec.current_A == 0) and np.all(rec.capacity_Ah == 0)
    assert labtwin_cycles(rec) == []


# --- labtwin import --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [NDA, NDAX, GCPL, MB, OCV], ids=lambda p: p.name)
def test_labtwin_import_stores_each_file_once(tmp_path, path):
    db = tmp_path / "x.db"
    first = runner.invoke(app, ["import", str(path), "--store", str(db), "--json"])
    assert first.exit_code == 0, first.output
    (result,) = json.loads(first.output)["imports"]
    assert result["imported"] and result["samples"] == len(read_recording(path))
    again = runner.invoke(app, ["import", str(path), "--store", str(db)])
    assert again.exit_code == 0 and "already imported" in again.output, again.output
    store = Store.open(db)
    try:
        stored = summarize_cycles(store.step_events(result["run_id"]))
        assert store.sample_count(result["run_id"]) == result["samples"]
    finally:
        store.close()
    direct = labtwin_cycles(read_recording(path))
    assert [c.cycle for c in stored] == [c.cycle for c in direct]
    for a, b in zip(stored, direct):
        assert (a.charge_Ah, a.discharge_Ah) == pytest.approx((b.charge_Ah, b.discharge_Ah), rel=1e-12, abs=1e-18)
        assert (a.coulombic_efficiency is None) == (b.coulombic_efficiency is None)
        if b.coulombic_efficiency is not None:
            assert a.coulombic_efficiency == pytest.approx(b.coulombic_efficiency, rel=1e-12)


# --- files that are not what they say ---------------------------------------------------------------------------


def _cut(src: Path, dst: Path, n_bytes: int) -> Path:
    dst.write_bytes(src.read_bytes()[:n_bytes])
    return dst


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda d: _cut(NDA, d / "cut.nda", 100_000), "cut.nda"),  # part-way through the records
        (lambda d: _cut(NDA, d / "head.nda", 60_000), "head.nda"),  # before the records
        (lambda d: _cut(NDAX, d / "cut.ndax", 20_000), "cut.ndax"),
        (lambda d: _cut(MB, d / "cut.mpr", 50_000), "cut.mpr"),
        (lambda d: _cut(OCV, d / "cut_ocv.mpr", 9_000), "cut_ocv.mpr"),
        (lambda d: _garbage(d / "garbage.nda"), "garbage.nda"),
        (lambda d: _garbage(d / "garbage.ndax"), "garbage.ndax"),
        (lambda d: _garbage(d / "garbage.mpr"), "garbage.mpr"),
        (lambda d: _empty(d / "empty.nda"), "empty.nda"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_truncated_or_garbage_file_is_one_line_naming_it(tmp_path, make, name):
    path = make(tmp_path)
    with pytest.raises(RecordingError) as err:
        read_recording(path)
    message = str(err.value)
    assert name in message and "\n" not in message, message


def _garbage(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def test_a_gzipped_neware_file_is_refused_with_the_reason(tmp_path):
    import gzip

    path = tmp_path / "test.nda.gz"
    with NDA.open("rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with pytest.raises(RecordingError, match=r"test.nda.gz: .*gunzip it first"):
        read_recording(path)
