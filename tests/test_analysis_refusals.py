"""Garbage in, a clear error out: a cycling file is not a GITT, an undetermined circuit parameter is said so."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from labtwin.cli import app

runner = CliRunner()
DATA = Path(__file__).resolve().parent / "data"


def _cycling_csv(path: Path) -> Path:
    """Two full half cycles with rests around them: "pulses" to a naive reader, not a titration."""
    rows = ["time_s,voltage_V,current_A,step"]
    t = 0.0
    for step, (current, n) in enumerate([(0.0, 30), (1e-3, 360), (0.0, 30), (-1e-3, 350), (0.0, 30)]):
        for j in range(n):
            v = 3.0 if current == 0 else (3.5 + 0.6 * j / n if current > 0 else 4.1 - 0.6 * j / n)
            rows.append(f"{t},{v},{current},{step}")
            t += 10.0
    path.write_text("\n".join(rows) + "\n")
    return path


def test_analyze_gitt_refuses_a_cycling_file(tmp_path):
    path = _cycling_csv(tmp_path / "samples.csv")
    result = runner.invoke(app, ["analyze", "gitt", str(path)])
    assert result.exit_code == 2
    assert "samples.csv" in result.output and "is this a GITT recording?" in result.output


def test_analyze_eis_names_a_parameter_the_spectrum_does_not_determine():
    spectrum = DATA / "eis" / "Circuit1_EIS_1.z"  # a dummy R0-p(R1,C1): a Warburg added to it is not there
    result = runner.invoke(app, ["analyze", "eis", str(spectrum), "--circuit", "R0-p(R1,C1)-W1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["undetermined"] == ["W1"]
    result = runner.invoke(app, ["analyze", "eis", str(spectrum), "--circuit", "R0-p(R1,C1)", "--json"])
    assert json.loads(result.output)["undetermined"] == []
    result = runner.invoke(app, ["analyze", "eis", str(spectrum), "--circuit", "R0-p(R1,C1)-W1"])
    assert "warning: spectrum 'Circuit1_EIS_1': W1 =" in result.output and "not determined" in result.output
