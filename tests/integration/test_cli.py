"""The CLI as a user runs it: dryrun writes its files, runs lists, export writes unit-bearing columns."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labtwin.cli import app

pytestmark = pytest.mark.usefixtures("prefect_api")
runner = CliRunner()


def test_dryrun_export_and_runs(tmp_path):
    out = tmp_path / "dry"
    result = runner.invoke(app, ["dryrun", "lto_formation", "--sim", "lto_bare_thinfilm", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == "success" and len(summary["cycles"]) == 5
    assert summary["cell_time_s"] > 5 * 3600  # five 1C cycles plus rests
    with (out / "samples.csv").open() as fh:
        rows = [r for r in csv.reader(fh) if not r[0].startswith("#")]
    assert rows[0][:7] == ["time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle"]
    assert len(rows) - 1 == summary["n_samples"]
    assert json.loads((out / "summary.json").read_text())["run_id"] == summary["run_id"]

    db = str(out / "dryrun.db")
    listed = json.loads(runner.invoke(app, ["runs", "--store", db, "--json"]).stdout)
    assert listed[0]["stored_samples"] == summary["n_samples"]
    bdf = tmp_path / "run.bdf"
    result = runner.invoke(app, ["export", summary["run_id"][:12], "--format", "bdf", "--out", str(bdf), "--store", db])
    assert result.exit_code == 0, result.output
    header = bdf.read_text().splitlines()[0].split(",")
    assert header[:3] == ["Test Time / s", "Voltage / V", "Current / A"] and "Cycle Count / 1" in header
    pq = tmp_path / "run.parquet"
    assert (
        runner.invoke(
            app, ["export", summary["run_id"], "--format", "parquet", "--out", str(pq), "--store", db]
        ).exit_code
        == 0
    )
    import pyarrow.parquet as papq

    assert papq.read_table(pq).num_rows == summary["n_samples"]


def test_dryrun_of_a_malformed_protocol_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "metadata: {name: x}\nsafety: {voltage_min_V: 1, voltage_max_V: 3}\nmethod:\n  - cc: {c_rate: fast, until: {voltage_V: 2}}\n"
    )
    result = runner.invoke(app, ["dryrun", str(bad), "--sim", "lto_bare_thinfilm"])
    assert result.exit_code == 2
    assert "method[0].cc.c_rate" in result.output and "fast" in result.output


def test_unknown_export_format_is_refused_with_the_choices(tmp_path):
    result = runner.invoke(app, ["export", "x", "--format", "xlsx", "--store", str(tmp_path / "e.db")])
    assert result.exit_code == 2 and "csv, parquet, bdf" in result.output


def test_layering_contracts_hold():
    """Every room imports only the rooms below it, and Prefect only inside orchestration (pyproject's contracts)."""
    lint = [
        sys.executable,
        "-c",
        "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
    ]
    proc = subprocess.run(lint, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dryrun_of_the_seed000_protocol_shows_plateau_oscillations_and_writes_eis(tmp_path):
    """Issue 3's 'done means': the seed-000 protocol on the bare LTO cell, through flow, bus and agent."""
    import numpy as np

    from labtwin.analysis.plateau import plateau_oscillation

    out = tmp_path / "lto"
    result = runner.invoke(app, ["dryrun", "seed000-lto-0.1C", "--sim", "lto-thin-film", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exit_status"] == "success"
    # The twin followed the run: oscillation onset on every galvanostatic half cycle, nothing else.
    kinds = [(a["kind"], a["step"]) for a in report["anomalies"]]
    assert kinds == [("oscillation_onset", step) for step in (1, 2, 3, 4)], kinds
    assert json.loads((out / "anomalies.json").read_text()) == report["anomalies"]
    from labtwin.data.store import Store

    stored = Store.open(str(out / "dryrun.db"))
    assert [a.kind for a in stored.anomalies(report["run_id"])] == ["oscillation_onset"] * 4  # the recorder kept them
    assert stored.cell_states(report["cell_id"])[-1].cycle == 2
    rows = list(csv.DictReader(line for line in (out / "samples.csv").open() if not line.startswith("#")))
    step = np.array([int(r["step"]) for r in rows])
    first_discharge = step == 1
    q = np.array([float(r["capacity_Ah"]) for r in rows])[first_discharge]
    v = np.array([float(r["voltage_V"]) for r in rows])[first_discharge]
    osc = plateau_oscillation(-(q - q[0]), v)
    assert 1.5e-3 <= osc.amplitude_V <= 4e-3
    assert 0.4 <= osc.period_Ah * 1e6 / 1.89 <= 1.0
    eis = list(csv.DictReader(line for line in (out / "eis.csv").open() if not line.startswith("#")))
    assert len(eis) >= 40 and all(float(r["z_real_ohm"]) > 0 for r in eis)
    for plot in ("run.png", "plateau.png", "nyquist.png"):
        assert (out / plot).stat().st_size > 10_000, plot  # a rendered figure, not an empty file
    assert {int(r["cycle"]) for r in eis} == {2}  # the EIS after the first full cycle sits in cycle 2


def test_dryrun_of_the_seed000_protocol_on_the_azo60_cell_raises_no_anomaly(tmp_path):
    """The healthy side of issue 4's 'done means': the same protocol on the coated film, twin on, is silent
    (the oscillation detector, the twin residual and the voltage-jump watch all see a smooth plateau)."""
    from labtwin.analysis.plateau import plateau_oscillation

    out = tmp_path / "azo"
    result = runner.invoke(
        app, ["dryrun", "seed000-lto-0.1C", "--sim", "lto-thin-film-azo60", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["exit_status"] == "success"
    assert report["anomalies"] == []
    rows = list(csv.DictReader(line for line in (out / "samples.csv").open() if not line.startswith("#")))
    first_discharge = [r for r in rows if int(r["step"]) == 1]
    import numpy as np

    q = np.array([float(r["capacity_Ah"]) for r in first_discharge])
    v = np.array([float(r["voltage_V"]) for r in first_discharge])
    assert plateau_oscillation(-(q - q[0]), v).amplitude_V < 0.5e-3
    assert abs(np.median(v) - 1.55) < 0.01  # the plateau is where seed 000 puts it


def test_analyse_eis_fits_a_measured_file_and_refuses_a_bad_circuit(tmp_path):
    from pathlib import Path

    measured = Path(__file__).resolve().parents[1] / "data" / "eis" / "Circuit1_EIS_1.z"
    result = runner.invoke(
        app, ["analyze", "eis", str(measured), "-c", "L0-R0-p(R1,C1)", "--json", "--plot", str(tmp_path / "fit.png")]
    )
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)
    assert entry["circuit"] == "L0-R0-p(R1,C1)"
    assert set(entry["parameters"]) == set(entry["units"]) == set(entry["uncertainties"]) == {"L0", "R0", "R1", "C1"}
    assert entry["lin_kk"]["valid"]
    assert entry["relative_rms"] < 0.01
    assert 20 < entry["parameters"]["R0"] < 40 and 30 < entry["parameters"]["R1"] < 60
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    bad = runner.invoke(app, ["analyse", "eis", str(measured), "-c", "R0-p(R1,C1"])
    assert bad.exit_code == 2
    assert "not closed" in bad.output


def test_dryrun_of_seed001_then_analyze_cv_returns_the_film_diffusivity(tmp_path):
    out = tmp_path / "cv"
    result = runner.invoke(
        app, ["dryrun", "seed001-cv-multirate", "--sim", "lto-cv", "--out", str(out), "--no-twin", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert (out / "cv.png").stat().st_size > 10_000
    result = runner.invoke(
        app,
        [
            "analyze",
            "cv",
            str(out / "samples.csv"),
            "--cell",
            "lto-cv",
            "--json",
            "--plot",
            str(tmp_path / "cv-peaks.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rates = [v["scan_rate_V_s"] for v in report["voltammograms"]]
    assert rates == pytest.approx([0.01, 0.02, 0.05, 0.1, 0.2, 0.5], rel=1e-3)  # the holds between rates are not sweeps
    separations = [v["peak_separation_V"] for v in report["voltammograms"]]
    assert all(b > a for a, b in zip(separations, separations[1:]))
    assert report["randles_sevcik"]["diffusivity_m2_s"] == pytest.approx(2.47e-15, rel=0.2)
    assert (tmp_path / "cv-peaks.png").stat().st_size > 10_000


def test_gitt_dry_runs_end_at_the_cutoff_and_show_bare_lco_polarization_far_above_glassy_ceramic(tmp_path):
    mean_polarization = {}
    for cell in ("lco-lgps-bare", "lco-lgps-glassy-ceramic"):
        out = tmp_path / cell
        result = runner.invoke(app, ["dryrun", "seed003-gitt", "--sim", cell, "--out", str(out), "--no-twin", "--json"])
        assert result.exit_code == 0, result.output
        assert (
            json.loads(result.output)["exit_status"] == "success"
        )  # the last pulse stops at 1.88 V, not at the safety limit
        result = runner.invoke(
            app,
            ["analyze", "gitt", str(out / "samples.csv"), "--cell", cell, "--json", "--plot", str(out / "gitt.png")],
        )
        assert (out / "gitt.png").stat().st_size > 10_000
        assert result.exit_code == 0, result.output
        pulses = json.loads(result.output)["pulses"]
        assert len(pulses) >= 10 and all(p["diffusivity_m2_s"] > 0 for p in pulses)
        mean_polarization[cell] = sum(p["polarization_V"] for p in pulses) / len(pulses)
    assert mean_polarization["lco-lgps-bare"] > 3 * mean_polarization["lco-lgps-glassy-ceramic"] > 0  # seed 003's order
