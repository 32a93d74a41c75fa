"""Control flow through the real path (Prefect flow -> MQTT -> agent -> simulated cell): a rest that ends on
dV/dt, a loop, a goto taken when a pulse times out, a stop on a condition."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from labtwin.cli import app

runner = CliRunner()

PROTOCOL = """
metadata: {name: control flow on a cell, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - Discharge at 1C until 1.4 V
  - rest: {duration_s: 7200, until: {dvdt_V_per_h: 0.01}, label: relax}
  - loop: {until: {discharge_capacity_Ah_below: 1.0e-9}, max_cycles: 2}
    tag: cycling
    steps:
      - Charge at 1C until 2.5 V
      - Discharge at 1C until 1.2 V
  - cc: {c_rate: 5, until: {voltage_V: 2.9, time_s: 60}, then: {time_s: goto gentle}, label: pulse}
  - cc: {c_rate: 2, until: {voltage_V: 2.5}, label: skipped}
  - cc: {c_rate: 0.5, until: {voltage_V: 2.5}, tag: gentle, label: gentle, then: {voltage_V: stop}}
  - cc: {c_rate: -1, until: {voltage_V: 1.2}, label: never}
"""


def test_a_protocol_with_loops_gotos_and_a_stop_runs_as_written(tmp_path):
    path = tmp_path / "control.yaml"
    path.write_text(PROTOCOL)
    result = runner.invoke(app, ["dryrun", str(path), "--sim", "lto_bare_thinfilm", "--json", "--no-twin"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ends = report["step_ends"]
    assert [e["label"] for e in ends] == [
        "Discharge at 1C until 1.4 V",
        "relax",
        "Charge at 1C until 2.5 V",
        "Discharge at 1C until 1.2 V",
        "Charge at 1C until 2.5 V",
        "Discharge at 1C until 1.2 V",
        "pulse",
        "gentle",
    ]
    assert [e["step_index"] for e in ends] == list(range(8))  # execution order, unique in the run
    relax = ends[1]
    # The LTO film relaxes within minutes after a 1C discharge: dV/dt ends the rest long before its 2 h.
    assert relax["reason"] == "end_condition:dvdt_V_per_h" and 100 <= relax["duration_s"] < 3600
    assert ends[6]["reason"] == "end_condition:time_s" and ends[6]["duration_s"] == 60  # 60 s at 5C: no 2.9 V yet
    assert ends[7]["reason"] == "end_condition:voltage_V"
    assert report["exit_status"] == "success" and "(gentle) ended on voltage_V: then stop" in report["reason"]


def test_a_constant_power_discharge_holds_its_power_as_the_voltage_falls(tmp_path):
    path = tmp_path / "cp.yaml"
    path.write_text("""
metadata: {name: constant power, nominal_capacity_Ah: 1.2e-3}
record: {interval_s: 10}
safety: {voltage_min_V: 1.9, voltage_max_V: 3.7}
method:
  - cccv: {c_rate: 0.5, voltage_V: 3.6, until: {c_rate: 0.05}}
  - cp: {power_W: -0.002, until: {voltage_V: 2.5}}
""")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["dryrun", str(path), "--sim", "lco_lgps_glassy", "--json", "--no-twin", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["step_ends"][1]["reason"] == "end_condition:voltage_V"
    import numpy as np

    data = np.genfromtxt(out / "samples.csv", delimiter=",", names=True, skip_header=1)
    cp = data[data["step"] == 1]
    power_W = cp["voltage_V"] * cp["current_A"]
    assert cp["voltage_V"][0] - cp["voltage_V"][-1] > 0.8  # the voltage fell a long way...
    # ...and the power held: the current is P over the previous sample's voltage, so each sample lags by the
    # voltage change in one interval (largest on the first, from the rest voltage; ~1 % as the knee steepens).
    # The last sample is clamped at the 2.5 V end voltage by the source's compliance, as a cycler's end is.
    error = np.abs(power_W[:-1] / -0.002 - 1)
    assert error[0] < 0.06 and error[1:].max() < 0.02 and abs(power_W[:-1].mean() / -0.002 - 1) < 0.005
    assert abs(cp["current_A"][-2] / cp["current_A"][0]) > 1.3  # so the current rose to keep it


def test_recording_by_voltage_change_keeps_the_plateau_sparse_and_the_knee_dense(tmp_path):
    path = tmp_path / "rec.yaml"
    path.write_text("""
metadata: {name: record by change, nominal_capacity_Ah: 5.18e-5}
record: {interval_s: 600, voltage_change_V: 0.005, poll_interval_s: 10}
safety: {voltage_min_V: 0.5, voltage_max_V: 3.0}
method:
  - Discharge at 1C until 1.2 V
""")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["dryrun", str(path), "--sim", "lto_bare_thinfilm", "--json", "--no-twin", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    import numpy as np

    data = np.genfromtxt(out / "samples.csv", delimiter=",", names=True, skip_header=1)
    t, v = data["time_s"], data["voltage_V"]
    polls = report["step_ends"][0]["duration_s"] / 10
    assert len(t) < polls / 4  # the agent read the cell every 10 s but kept a fraction of it
    dt, dv = np.diff(t)[:-1], np.abs(np.diff(v))[:-1]  # the last sample is the step's end, always kept
    assert (dt <= 600 + 1e-6).all() and ((dt >= 600 - 1e-6) | (dv >= 0.005)).all()  # each kept for a reason
    assert (dv >= 0.005).sum() >= 5 and (dt >= 600 - 1e-6).sum() >= 3  # both rules at work (knee, plateau)
    assert v[-1] <= 1.2  # the reading that ended the step is in the record
