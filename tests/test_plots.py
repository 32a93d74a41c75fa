"""Issue 15's CLI half: the cycling plots as PNG (analyze cycling --plot DIR) and progress on the long commands.

The figures are read back twice: as PNG files (opened, not blank) and as the matplotlib figures the
writer builds (axis labels with units, the colour bar, and lines holding the run's own per-cycle data,
as labtwin.analysis.cycles defines it). Progress is seen as a user sees it: lines on stderr with
--progress off a terminal (stdout still one JSON document), rich bars on a pseudo-terminal.
"""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from labtwin.analysis.cycles import charge_increments, summarize_cycles
from labtwin.analysis.plots import (
    CYCLING_PLOTS,
    capacity_figure,
    dqdv_figure,
    time_figure,
    voltage_capacity_figure,
)
from labtwin.cli import app
from labtwin.cli.progress import RunProgress, progress_mode
from labtwin.data.store import Store
from labtwin.documents import RunStart, RunStop, StepEvent, StepKind
from labtwin.documents.base import utc_now

runner = CliRunner()
LABTWIN = [sys.executable, "-m", "labtwin.cli"]

# Three 1C cycles of the equivalent-circuit LCO cell: 7 steps, about a second at max speed.
SHORT_CYCLING = (
    "metadata: {name: short cycling, chemistry: LCO|LGPS|Li-In}\n"
    "record: {interval_s: 10}\n"
    "safety: {voltage_min_V: 1.9, voltage_max_V: 3.7}\n"
    "method:\n"
    "  - rest: {duration_s: 60}\n"
    "  - repeat: 3\n"
    "    steps:\n"
    "      - cc: {c_rate: 1.0, until: {voltage_V: 3.6}}\n"
    "      - cc: {c_rate: -1.0, until: {voltage_V: 2.0}}\n"
)
CELL = "lco_lgps_glassy"


@pytest.fixture(scope="module")
def dryrun(tmp_path_factory, prefect_api):
    """One dry-run of SHORT_CYCLING with --out, --json and --progress: (its folder, the CLI result, its JSON)."""
    from labtwin.agent import spool
    from labtwin.bus import sessions

    folder = tmp_path_factory.mktemp("cycling")
    protocol = folder / "short.yaml"
    protocol.write_text(SHORT_CYCLING)
    with pytest.MonkeyPatch.context() as mp:  # the agent's spool and session in this folder (conftest's rule)
        mp.setattr(spool, "DEFAULT_SPOOL_DIR", folder / "labtwin-data" / "spool")
        mp.setattr(sessions, "SESSION_DIR", folder / "labtwin-data" / "sessions")
        mp.chdir(folder)
        result = runner.invoke(
            app,
            ["dryrun", str(protocol), "--sim", CELL, "--no-twin", "--out", str(folder / "dry"), "--json", "--progress"],
        )
    assert result.exit_code == 0, result.output
    return folder, result, json.loads(result.stdout)


def _run_data(folder: Path, run_id: str):
    store = Store.open(str(folder / "dry" / "dryrun.db"))
    try:
        return store.samples(run_id), store.step_events(run_id)
    finally:
        store.close()


def _colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_ylabel() == "cycle"]


def test_a_dryrun_with_progress_prints_step_and_cycle_lines_on_stderr_and_clean_json_on_stdout(dryrun):
    _, result, summary = dryrun
    assert summary["exit_status"] == "success" and summary["steps_run"] == 7  # stdout is the one JSON document
    lines = [line for line in result.stderr.splitlines() if line.startswith("sim: ")]
    assert lines[0].startswith(f"sim: run {summary['run_id']} started: short cycling")
    ended = [line for line in lines if " ended by " in line]
    assert len(ended) == 7
    assert "step 6 ended by end_condition:voltage_V, cycle 3: discharge" in ended[-1]
    assert "7/7 steps done" in ended[-1] and "cell time 2.00 h" in ended[-1]
    assert any("step 1 started, cycle 1: charge" in line for line in lines)
    assert any("ETA 0:0" in line for line in ended[:-1])  # an estimate once a step has ended
    assert lines[-1].startswith("sim: run success")


def test_analyze_cycling_writes_every_plot_into_the_directory_and_prints_the_paths(dryrun):
    folder, _, summary = dryrun
    out = folder / "plots"
    store = str(folder / "dry" / "dryrun.db")
    result = runner.invoke(app, ["analyze", "cycling", summary["run_id"][:18], "--store", store, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert "dryrun-lco_lgps_glassy · short cycling: 3 cycles" in result.stdout  # the cell and the protocol
    for name in CYCLING_PLOTS.values():
        path = out / name
        assert f"wrote {path}" in result.stdout
        image = mpimg.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500, name
        pixels = image[..., :3].reshape(-1, 3)
        assert float(pixels.std()) > 0.05, name  # not a blank canvas
        assert len(np.unique((pixels * 255).astype(int), axis=0)) > 50, name  # lines, text, colour bar
    as_json = runner.invoke(
        app, ["analyze", "cycling", summary["run_id"], "--store", store, "--plot", str(out), "--json"]
    )
    assert json.loads(as_json.stdout)["plots"] == [str(out / name) for name in CYCLING_PLOTS.values()]


def test_the_v_q_lines_are_the_runs_per_cycle_charge_and_voltage_with_a_colour_bar(dryrun):
    folder, _, summary = dryrun
    samples, events = _run_data(folder, summary["run_id"])
    fig = voltage_capacity_figure(samples, "cell · protocol")
    try:
        ax = fig.axes[0]
        assert ax.get_xlabel() == "charge since the cycle began / mAh (+ = into the cell)"
        assert ax.get_ylabel() == "voltage / V"
        assert "cell · protocol" in ax.get_title()
        (bar,) = _colorbar_axes(fig)
        assert bar.get_ylim() == (1.0, 3.0)  # cycles 1 to 3
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert sorted(lines) == ["cycle 1", "cycle 2", "cycle 3"]
        dq = charge_increments(samples["time_s"], samples["current_A"], samples["step"], samples["capacity_Ah"])
        by_cycle = {c.cycle: c for c in summarize_cycles(events)}
        for cycle in (1, 2, 3):
            rows = samples["cycle"] == cycle
            line = lines[f"cycle {cycle}"]
            np.testing.assert_allclose(line.get_ydata(), samples["voltage_V"][rows])
            np.testing.assert_allclose(line.get_xdata(), np.cumsum(dq[rows]) * 1e3)
            # The line ends where the cycle's charge in minus charge out puts it (the agent's step figures).
            net_mAh = (by_cycle[cycle].charge_Ah - by_cycle[cycle].discharge_Ah) * 1e3
            assert line.get_xdata()[-1] == pytest.approx(net_mAh, abs=1e-3 * by_cycle[cycle].charge_Ah * 1e3)
            assert max(line.get_xdata()) == pytest.approx(by_cycle[cycle].charge_Ah * 1e3, rel=0.02)
        colours = [tuple(lines[f"cycle {c}"].get_color()) for c in (1, 2, 3)]
        assert len(set(colours)) == 3  # coloured by cycle number
    finally:
        plt.close(fig)


def test_capacity_and_ce_per_cycle_come_from_summarize_cycles(dryrun):
    folder, _, summary = dryrun
    _, events = _run_data(folder, summary["run_id"])
    cycles = summarize_cycles(events)
    fig = capacity_figure(cycles, "cell · protocol")
    try:
        ax_q, ax_ce = fig.axes
        assert ax_q.get_ylabel() == "capacity / mAh" and ax_ce.get_ylabel() == "Coulombic efficiency / %"
        assert ax_ce.get_xlabel() == "cycle"
        assert "cell · protocol" in fig.get_suptitle()
        charge, discharge = ax_q.get_lines()
        assert list(charge.get_xdata()) == [1, 2, 3]
        np.testing.assert_allclose(charge.get_ydata(), [c.charge_Ah * 1e3 for c in cycles])
        np.testing.assert_allclose(discharge.get_ydata(), [c.discharge_Ah * 1e3 for c in cycles])
        np.testing.assert_allclose(ax_ce.get_lines()[0].get_ydata(), [100 * c.coulombic_efficiency for c in cycles])
        np.testing.assert_allclose(
            ax_ce.get_lines()[0].get_ydata(), [100 * c["coulombic_efficiency"] for c in summary["cycles"]]
        )
        assert ax_ce.get_title() == "CE = discharge / charge"  # a cathode cell, charged first
    finally:
        plt.close(fig)


def test_dqdv_and_the_time_plots_have_units_on_every_axis(dryrun):
    folder, _, summary = dryrun
    samples, events = _run_data(folder, summary["run_id"])
    fig = dqdv_figure(samples, events, "cell · protocol")
    try:
        ax = fig.axes[0]
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("voltage / V", "dQ/dV / mAh/V (charge +, discharge -)")
        assert len(_colorbar_axes(fig)) == 1
        labels = sorted(line.get_label() for line in ax.get_lines() if line.get_label().startswith("cycle"))
        assert labels == sorted(f"cycle {c} {d}" for c in (1, 2, 3) for d in ("charge", "discharge"))
        for line in ax.get_lines():
            if line.get_label().endswith("discharge"):
                assert np.all(line.get_ydata() <= 0)  # discharge below the axis
                v = samples["voltage_V"][
                    (samples["cycle"] == int(line.get_label().split()[1])) & (samples["current_A"] < 0)
                ]
                assert min(line.get_xdata()) == pytest.approx(v.min()) and max(line.get_xdata()) == pytest.approx(
                    v.max()
                )
    finally:
        plt.close(fig)
    fig = time_figure(samples, "cell · protocol")
    try:
        ax_v, ax_i = fig.axes
        assert ax_v.get_ylabel() == "voltage / V" and ax_i.get_xlabel() == "cell time / h"
        assert ax_i.get_ylabel() == "current / mA (+ = charge)"  # 1C of 1.2 mAh
        np.testing.assert_allclose(ax_i.get_lines()[0].get_ydata(), samples["current_A"] * 1e3)
        np.testing.assert_allclose(ax_v.get_lines()[0].get_xdata(), samples["time_s"] / 3600)
    finally:
        plt.close(fig)


def test_a_recording_gets_the_same_plots_and_the_title_of_its_dryrun(dryrun, tmp_path):
    folder, _, _ = dryrun
    result = runner.invoke(
        app, ["analyze", "cycling", str(folder / "dry" / "samples.csv"), "--plot", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(Path(p).name for p in json.loads(result.stdout)["plots"]) == sorted(CYCLING_PLOTS.values())
    single = tmp_path / "only-dqdv.png"  # the old form: a .png path is dQ/dV alone
    result = runner.invoke(app, ["analyze", "cycling", str(folder / "dry" / "samples.csv"), "--plot", str(single)])
    assert result.exit_code == 0, result.output
    assert f"wrote {single}" in result.stdout and mpimg.imread(single).shape[0] > 300
    assert "dryrun-lco_lgps_glassy · short cycling" in result.stdout  # from the summary.json beside the file


def test_an_anode_half_cell_reads_ce_as_charge_over_discharge(tmp_path):
    """Lithiation first (LTO|Li): CE is the delithiation over the lithiation, and the plots say so."""
    t = np.arange(0, 4 * 7200.0, 20.0)
    phase = (t // 3600).astype(int)  # discharge, charge, discharge, charge, ...
    current = np.where(phase % 2 == 0, -1e-4, 0.95e-4)
    q = np.cumsum(current * 20.0) / 3600.0
    voltage = 1.55 + 0.2 * np.where(phase % 2 == 0, -1, 1) + 0.01 * np.sin(t / 500.0)
    rows = ["time_s,voltage_V,current_A,capacity_Ah,step,cycle"]
    rows += [f"{a},{b},{c},{d},{p},{p // 2 + 1}" for a, b, c, d, p in zip(t, voltage, current, q, phase)]
    path = tmp_path / "lto.csv"
    path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "plots"
    result = runner.invoke(app, ["analyze", "cycling", str(path), "--plot", str(out), "--json"])
    assert result.exit_code == 0, result.output
    cycles = json.loads(result.stdout)["cycles"]
    assert [c["coulombic_efficiency"] for c in cycles] == pytest.approx([0.95] * 4, rel=0.01)
    image = mpimg.imread(out / CYCLING_PLOTS["capacity"])
    assert float(image[..., :3].std()) > 0.05


# --------------------------------------------------------------------------- progress


def _lines_view(channels=None) -> tuple[RunProgress, io.StringIO]:
    text = io.StringIO()
    return RunProgress(Console(file=text, width=200), "lines", channels, since=utc_now()), text


def _start(run_id: str, channel: str = "ch1", n_steps: int = 2, **kw) -> RunStart:
    return RunStart(run_id=run_id, lab="l", channel=channel, cell_id="c1", protocol="p", n_steps=n_steps, **kw)


def _step(run_id: str, k: int, event: str, cycle: int = 1, channel: str = "ch1", time_s: float = 0.0) -> StepEvent:
    return StepEvent(
        run_id=run_id,
        channel=channel,
        step_index=k,
        label=f"step {k}",
        cycle=cycle,
        step=StepKind.cc,
        event=event,
        time_s=time_s,
    )


def test_progress_shows_each_channels_own_runs_and_counts_on_past_a_loops_listed_steps():
    view, text = _lines_view(["ch1", "ch2"])
    view.take(_start("old", time=utc_now() - timedelta(hours=1)))  # an earlier run's, republished: not this one's
    view.take(_step("old", 0, "ended"))
    view.take(_start("other", channel="ch9"))  # not a channel of this command
    view.take(_start("r1"))
    view.take(_step("r1", 0, "started"))
    view.take(_step("r1", 0, "ended", time_s=3600))
    view.take(_step("r1", 1, "ended", cycle=2, time_s=7200))
    view.take(_step("r1", 0, "ended", cycle=3, time_s=9000))  # a loop goes round again: past the 2 listed
    view.take(RunStop(run_id="r1", channel="ch1", exit_status="success", cell_time_s=9000))
    view.take("not a document")
    lines = text.getvalue().splitlines()
    assert all("old" not in line and "ch9" not in line for line in lines)
    assert lines[0].startswith("ch1: run r1 started: p on c1, 2 steps")
    assert "1/2 steps done · cell time 1.00 h" in lines[2]
    assert "2/2 steps done" in lines[3] and "cycle 2" in lines[3] and lines[3].endswith("ETA 0:00")
    assert "3/2 steps done" in lines[4] and lines[4].endswith("ETA ?")  # past the listed total: no estimate
    assert lines[5] == "ch1: run success · 3/2 steps done · cell time 2.50 h · ETA 0:00"
    assert view.all_stopped


def test_progress_shows_on_a_terminal_without_json_or_when_forced():
    terminal, piped = Console(force_terminal=True), Console(file=io.StringIO())
    assert progress_mode(None, False, terminal) == "live"
    assert progress_mode(None, True, terminal) == "off"  # --json
    assert progress_mode(None, False, piped) == "off"  # 2> file, CI
    assert progress_mode(True, True, piped) == "lines"  # forced: plain lines off a terminal
    assert progress_mode(True, False, terminal) == "live"
    assert progress_mode(False, False, terminal) == "off"


def test_labtwin_run_with_progress_keeps_its_json_clean(tmp_path, prefect_api, monkeypatch):
    for name in [n for n in os.environ if n.startswith("LABTWIN_")]:
        monkeypatch.delenv(name)  # the lab file below, its embedded broker and store: not the caller's
    monkeypatch.chdir(tmp_path)
    protocol = tmp_path / "short.yaml"
    protocol.write_text(SHORT_CYCLING)
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        f"lab: progress{os.getpid()}\nstore: {tmp_path / 'runs.db'}\nchannels:\n"
        f"  ch1: {{driver: simulated, cell: {CELL}, speed: max, seed: 1, limits: {{voltage_min_V: 1.8, voltage_max_V: 3.8}}}}\n"
    )
    result = runner.invoke(app, ["run", str(protocol), "--channel", "ch1", "--lab", str(lab), "--json", "--progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == "success"
    lines = [line for line in result.stderr.splitlines() if line.startswith("ch1: ")]
    assert lines[0].startswith(f"ch1: run {summary['run_id']} started")
    assert sum(" ended by " in line for line in lines) == 7 and lines[-1].startswith("ch1: run success")


def test_a_dryrun_on_a_terminal_shows_progress_bars_on_stderr_only(tmp_path, prefect_api):
    """No flag: a pseudo-terminal on stderr gets the bars (step label, cycle, steps of total, cell time);
    stdout, a pipe, gets the results alone."""
    from prefect.settings import PREFECT_API_URL

    protocol = tmp_path / "short.yaml"
    protocol.write_text(SHORT_CYCLING)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "COLUMNS": "160"}
    for name in [n for n in env if n.startswith("LABTWIN_")]:
        del env[name]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*LABTWIN, "dryrun", str(protocol), "--sim", CELL, "--no-twin", "--speed", "3000"],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    terminal = b""
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk:
                    break
                terminal += chunk
            elif proc.poll() is not None:
                break
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, terminal.decode(errors="replace")
    shown = terminal.decode(errors="replace")
    # 2.4 s of wall time at 3000x: a frame every 0.25 s shows the steps as they run, the last one the end.
    assert re.search(r"sim short cycling · cycle [123]: (charge|discharge) 0\.0012 A", shown), shown
    assert "sim short cycling · success after 7 steps" in shown
    assert "7/7" in shown and "cell 2.00 h" in shown and "ETA" in shown
    assert "\x1b[" in shown  # drawn as a live display, with cursor codes
    results = stdout.decode()
    assert "\x1b[" not in results and "short cycling" in results and "estimated duration" in results
