"""Real Arbin, Maccor and LANDT files (tests/data/arbin, maccor, landt; see tests/data/README.md) read into
labtwin: rows, columns and units as the files state them, and per-cycle charge, discharge and coulombic
efficiency from labtwin (replay documents + summarize_cycles) against a reference computed here from the
files' raw columns (the cyclers' own capacity counters; for LANDT also the workbook's own cycle sheet),
with code that shares nothing with labtwin's readers."""

from __future__ import annotations

import csv
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from typer.testing import CliRunner

from labtwin.analysis.cycles import summarize_cycles
from labtwin.cli import app
from labtwin.data.replay import documents
from labtwin.documents import StepEvent
from labtwin.formats import RecordingError, read_recording

DATA = Path(__file__).parent / "data"
ARBIN_CSV = DATA / "arbin" / "arbin_example.csv"
ARBIN_XLSX = DATA / "arbin" / "bs542_004_gr_li_50ua_50mv_1v_191020_Channel_11.xlsx"
ARBIN_RES = DATA / "arbin" / "arbin_example.res"
MACCOR = DATA / "maccor" / "maccor_example.001"
LANDT = DATA / "landt" / "NJK_CC_156_C30_C_x30.xlsx"

needs_mdbtools = pytest.mark.skipif(
    shutil.which("mdb-export") is None, reason="Arbin .res is read through mdb-export: apt-get install mdbtools"
)


def labtwin_cycles(rec):
    docs = documents(rec, lab="test", channel="c", cell_id="cell")
    return summarize_cycles(d for d in docs if isinstance(d, StepEvent))


# --- the reference: the files' own counters, per step, numbered into cycles here ----------------------------


def segments(*labels):
    """Row ranges over which every label stays the same (a cycler's step)."""
    n = len(labels[0])
    cut = np.zeros(n - 1, bool)
    for label in labels:
        label = np.asarray(label)
        cut |= label[1:] != label[:-1]
    edges = np.concatenate([[0], np.nonzero(cut)[0] + 1, [n]])
    return list(zip(edges[:-1], edges[1:]))


def direction(charge, discharge):
    if charge > 10 * discharge and charge > 0:
        return "charge"
    if discharge > 10 * charge and discharge > 0:
        return "discharge"
    return None


def number_cycles(step_moves):
    """[(charge_Ah, discharge_Ah), ...] per step -> per cycle (charge_Ah, discharge_Ah, CE): a cycle opens with
    each step in the direction of the run's first moving step that follows a step the other way."""
    cycles, first, previous = [], None, None
    for charge, discharge in step_moves:
        d = direction(charge, discharge)
        if d is not None and (first is None or (d == first and previous != first)):
            first = first or d
            cycles.append({"charge": 0.0, "discharge": 0.0, "ways": set()})
        if cycles:
            cycles[-1]["charge"] += charge
            cycles[-1]["discharge"] += discharge
            if d:
                cycles[-1]["ways"].add(d)
        previous = d or previous
    out = []
    for c in cycles:
        ce = None
        if c["ways"] == {"charge", "discharge"}:
            ce = c["discharge"] / c["charge"] if first == "charge" else c["charge"] / c["discharge"]
        out.append((c["charge"], c["discharge"], ce))
    return out


def arbin_reference(step_index, cycle_index, charge_counter, discharge_counter):
    """Arbin's counters restart at each new Cycle_Index: a step moved its last value minus the value before
    it (zero where the step opens a cycle; the file's first value for its first step)."""
    moves = []
    for a, b in segments(step_index, cycle_index):
        fresh = a > 0 and cycle_index[a] != cycle_index[a - 1]
        before_c = 0.0 if fresh else charge_counter[max(a - 1, 0)]
        before_d = 0.0 if fresh else discharge_counter[max(a - 1, 0)]
        moves.append((charge_counter[b - 1] - before_c, discharge_counter[b - 1] - before_d))
    return number_cycles(moves)


def straddling_Ah(charge_counter, discharge_counter):
    """The charge on rows whose interval holds both directions (Arbin logs the row that crosses from a charge
    step into a discharge one with both counters grown). labtwin keeps one net charge per row, so such a row
    counts only its net: each cycle's charge and discharge may differ from the counters' by this much."""
    dc, dd = np.diff(charge_counter), np.diff(discharge_counter)
    both = (dc > 0) & (dd > 0)
    return float(np.sum(np.minimum(dc[both], dd[both])))


def assert_cycles_match(rec, reference, tolerance_Ah=0.0):
    got = labtwin_cycles(rec)
    assert len(got) == len(reference) > 0
    tol = tolerance_Ah + 1e-12
    for c, (charge, discharge, ce) in zip(got, reference):
        assert c.charge_Ah == pytest.approx(charge, rel=1e-9, abs=tol), c.cycle
        assert c.discharge_Ah == pytest.approx(discharge, rel=1e-9, abs=tol), c.cycle
        if ce is None:
            assert c.coulombic_efficiency is None, c.cycle
        else:
            assert c.coulombic_efficiency == pytest.approx(ce, rel=1e-9 + tol / charge + tol / discharge), c.cycle
    return got


# --- Arbin ---------------------------------------------------------------------------------------------------


def raw_arbin_csv(path=ARBIN_CSV):
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return {name: np.array([float(r[k]) for r in rows[1:]]) for k, name in enumerate(rows[0])}


def test_arbin_csv_rows_columns_and_units():
    raw = raw_arbin_csv()
    rec = read_recording(ARBIN_CSV)
    assert rec.source_format == "arbin-csv" and len(rec) == 2142 == len(raw["Test_Time"])
    # No units in this export's names: Arbin's s, V, A, degC, said so.
    np.testing.assert_array_equal(rec.time_s, raw["Test_Time"])
    np.testing.assert_array_equal(rec.voltage_V, raw["Voltage"])
    np.testing.assert_array_equal(rec.current_A, raw["Current"])
    np.testing.assert_array_equal(rec.temperature_C, raw["Temperature"])
    assert any("Arbin's units" in note for note in rec.notes)
    assert rec.unix_start_s == raw["DateTime"][0] - raw["Test_Time"][0] == 1499006353.0
    # The export starts mid-charge (0.88 Ah already counted): labtwin's net charge starts at zero.
    assert rec.capacity_Ah[0] == 0.0 and raw["Charge_Capacity"][0] > 0.88


def test_arbin_csv_cycles_match_the_files_own_counters():
    raw = raw_arbin_csv()
    reference = arbin_reference(
        raw["Step_Index"], raw["Cycle_Index"], raw["Charge_Capacity"], raw["Discharge_Capacity"]
    )
    assert len(reference) == 2
    straddling = straddling_Ah(raw["Charge_Capacity"], raw["Discharge_Capacity"])
    assert 0 < straddling < 1e-5  # two rows, at the start of cycle 2's charge and of its discharge
    assert_cycles_match(read_recording(ARBIN_CSV), reference, straddling)


@pytest.mark.parametrize(
    ("renamed", "factor_t", "factor_i"),
    [({"Current": "Current(mA)"}, 1.0, 1e-3), ({"Test_Time": "Test_Time(h)", "Current": "Current(A)"}, 3600.0, 1.0)],
)
def test_arbin_units_are_read_from_the_column_names(tmp_path, renamed, factor_t, factor_i):
    raw = raw_arbin_csv()
    lines = ARBIN_CSV.read_text().splitlines(keepends=True)
    header = [renamed.get(h, h) for h in lines[0].rstrip("\r\n").split(",")]
    path = tmp_path / "arbin_units.csv"
    path.write_text(",".join(header) + "\n" + "".join(lines[1:]))
    rec = read_recording(path)
    np.testing.assert_allclose(rec.time_s, raw["Test_Time"] * factor_t, rtol=1e-15)
    np.testing.assert_allclose(rec.current_A, raw["Current"] * factor_i, rtol=1e-15)


def test_an_unknown_unit_is_refused_naming_the_column(tmp_path):
    lines = ARBIN_CSV.read_text().splitlines(keepends=True)
    path = tmp_path / "arbin_kA.csv"
    path.write_text(lines[0].replace("Current,", "Current(kA),", 1) + "".join(lines[1:]))
    with pytest.raises(RecordingError) as err:
        read_recording(path)
    message = str(err.value)
    assert "Current(kA)" in message and "'kA'" in message and str(path) in message and "\n" not in message


def raw_arbin_xlsx():
    book = openpyxl.load_workbook(ARBIN_XLSX, read_only=True, data_only=True)
    rows = list(book["Channel_11_1"].iter_rows(values_only=True))
    book.close()
    return {name: np.array([r[k] for r in rows[1:]]) for k, name in enumerate(rows[0])}


def test_arbin_xlsx_rows_columns_and_units():
    raw = raw_arbin_xlsx()
    rec = read_recording(ARBIN_XLSX)
    assert rec.source_format == "arbin-xlsx" and len(rec) == 4526 == len(raw["Test_Time(s)"])
    np.testing.assert_array_equal(rec.time_s, raw["Test_Time(s)"].astype(float))
    np.testing.assert_array_equal(rec.voltage_V, raw["Voltage(V)"].astype(float))
    np.testing.assert_array_equal(rec.current_A, raw["Current(A)"].astype(float))
    assert np.all(np.isnan(rec.temperature_C))  # no temperature column: no reading, none invented
    assert rec.unix_start_s is None  # Date_Time is a spreadsheet date with no time zone
    assert rec.notes == []  # every name carries its unit


def test_arbin_xlsx_cycles_match_the_files_own_counters():
    """A graphite/Li half cell lithiated first; its schedule keeps Cycle_Index 1 throughout, labtwin counts
    the two discharge-charge cycles (the second one's charge is a 3-row start)."""
    raw = raw_arbin_xlsx()
    reference = arbin_reference(
        raw["Step_Index"],
        raw["Cycle_Index"],
        raw["Charge_Capacity(Ah)"].astype(float),
        raw["Discharge_Capacity(Ah)"].astype(float),
    )
    assert set(raw["Cycle_Index"]) == {1} and len(reference) == 2
    straddling = straddling_Ah(raw["Charge_Capacity(Ah)"].astype(float), raw["Discharge_Capacity(Ah)"].astype(float))
    assert 0 < straddling < 1e-7
    got = assert_cycles_match(read_recording(ARBIN_XLSX), reference, straddling)
    assert got[0].first_direction == "discharge"  # CE is charge / discharge for this anode half cell


@needs_mdbtools
def test_arbin_res_rows_and_cycles_match_the_files_own_counters(tmp_path):
    from galvani import res2sqlite

    db = tmp_path / "res.sqlite"
    res2sqlite.convert_arbin_to_sqlite(str(ARBIN_RES), str(db))
    con = sqlite3.connect(db)
    rows = np.array(
        con.execute(
            "SELECT Test_Time, Voltage, Current, Step_Index, Cycle_Index, Charge_Capacity, Discharge_Capacity "
            "FROM Channel_Normal_Table ORDER BY Test_ID, Data_Point"
        ).fetchall()
    )
    con.close()
    rec = read_recording(ARBIN_RES)
    assert rec.source_format == "arbin-res" and len(rec) == 2150 == len(rows)
    np.testing.assert_array_equal(rec.time_s, rows[:, 0])
    np.testing.assert_array_equal(rec.voltage_V, rows[:, 1])
    np.testing.assert_array_equal(rec.current_A, rows[:, 2])
    reference = arbin_reference(rows[:, 3], rows[:, 4], rows[:, 5], rows[:, 6])
    assert len(reference) == 4
    assert_cycles_match(rec, reference, straddling_Ah(rows[:, 5], rows[:, 6]))


# --- Maccor --------------------------------------------------------------------------------------------------


def test_maccor_classic_export_rows_columns_and_units():
    lines = MACCOR.read_text().splitlines()
    header = lines[1].split("\t")
    raw = [line.split("\t") for line in lines[2:]]
    column = {name: np.array([r[k] for r in raw]) for k, name in enumerate(header)}
    rec = read_recording(MACCOR)
    assert rec.source_format == "maccor-text" and len(rec) == 8
    np.testing.assert_allclose(rec.time_s, column["Test (Min)"].astype(float) * 60.0, rtol=1e-15)
    np.testing.assert_array_equal(rec.voltage_V, column["Volts"].astype(float))
    assert set(column["State"]) == {"R"} and np.all(rec.current_A == 0) and np.all(rec.capacity_Ah == 0)
    # Eight rows of a rest (the first minute of a formation): no current, so no cycle to report.
    assert labtwin_cycles(rec) == []


# --- LANDT ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def landt():
    book = openpyxl.load_workbook(LANDT, read_only=True, data_only=True)
    record = list(book["Record"].iter_rows(values_only=True))
    summary = list(book["Cycle"].iter_rows(values_only=True))
    book.close()
    raw = {name: [r[k] for r in record[1:]] for k, name in enumerate(record[0])}
    cycle_sheet = {name: [r[k] for r in summary[1:]] for k, name in enumerate(summary[0])}
    return raw, cycle_sheet, read_recording(LANDT)


def test_landt_rows_columns_and_units(landt):
    raw, _, rec = landt
    assert rec.source_format == "landt-xlsx" and len(rec) == 62305 == len(raw["Index"])
    np.testing.assert_allclose(rec.time_s, np.array(raw["TestTime/h"], float) * 3600.0, rtol=1e-15)
    np.testing.assert_array_equal(rec.voltage_V, np.array(raw["Voltage/V"], float))
    np.testing.assert_allclose(rec.current_A, np.array(raw["Current/mA"], float) * 1e-3, rtol=1e-15)
    assert np.all(np.isnan(rec.temperature_C))


def landt_reference(raw):
    """Capacity/mAh counts each step (a run of one State) from zero: the step moved its largest value."""
    state = np.array(raw["State"])
    capacity_Ah = np.array(raw["Capacity/mAh"], float) * 1e-3
    moves = []
    for a, b in segments(state):
        moved = capacity_Ah[a:b].max()
        moves.append(
            (moved, 0.0) if state[a].startswith("C") else (0.0, moved) if state[a].startswith("D") else (0.0, 0.0)
        )
    return number_cycles(moves)


def test_landt_cycles_match_the_record_sheet_and_the_cycle_sheet(landt):
    raw, cycle_sheet, rec = landt
    reference = landt_reference(raw)
    assert len(reference) == 30
    got = assert_cycles_match(rec, reference)
    # The LANDT software's own per-cycle table (cycle 0 is its empty first row), rounded to 0.1 uAh.
    numbers = cycle_sheet["Index"][1:]
    assert numbers == [c.cycle for c in got]
    charge = np.array(cycle_sheet["Charge-Cap/mAh"][1:], float) * 1e-3
    discharge = np.array(cycle_sheet["Discharge-Cap/mAh"][1:], float) * 1e-3
    np.testing.assert_allclose([c.charge_Ah for c in got], charge, atol=0.51e-7)
    np.testing.assert_allclose([c.discharge_Ah for c in got], discharge, atol=0.51e-7)
    # Its efficiency is from unrounded capacities; ours from the rounded ones: within their rounding.
    efficiency = np.array(cycle_sheet["Efficiency/%"][1:], float) / 100.0
    rounding = 0.5e-7 * (1 / charge + 1 / discharge) * efficiency
    assert np.all(np.abs(np.array([c.coulombic_efficiency for c in got]) - efficiency) <= rounding + 0.5e-4)


# --- dispatch, garbage and `labtwin import` ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.csv", b"hello,world\n1,2\n"),
        ("garbage.txt", b"this is not a cycler export\n"),
        ("garbage.xlsx", b"PK\x03\x04 not really a workbook"),
        ("garbage.001", bytes(range(256)) * 4),
        pytest.param("garbage.res", b"not an Access database", marks=needs_mdbtools),
    ],
)
def test_a_file_nobody_recognises_is_one_line_naming_it(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordingError) as err:
        read_recording(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    result = CliRunner().invoke(app, ["import", str(path), "--store", str(tmp_path / "x.db")])
    assert result.exit_code != 0 and str(path) in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_an_unrecognised_table_names_its_header_and_what_labtwin_reads(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("Zeit,Spannung,Strom\n0,3.1,0.1\n")
    with pytest.raises(RecordingError, match="unknown recording format") as err:
        read_recording(path)
    assert "'Spannung'" in str(err.value) and "Arbin" in str(err.value) and "LANDT" in str(err.value)


@pytest.mark.parametrize(
    "path",
    [ARBIN_CSV, ARBIN_XLSX, pytest.param(ARBIN_RES, marks=needs_mdbtools), MACCOR, LANDT],
    ids=lambda p: p.name,
)
def test_labtwin_import_stores_a_file_once(tmp_path, path):
    store = str(tmp_path / "x.db")
    runner = CliRunner()
    first = runner.invoke(app, ["import", str(path), "--store", store])
    assert first.exit_code == 0, first.output
    assert "stored as run" in first.output
    second = runner.invoke(app, ["import", str(path), "--store", store])
    assert second.exit_code == 0 and "already imported" in second.output
