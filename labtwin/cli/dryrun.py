"""`labtwin dryrun`: the same flow, agent and safety checks as a real run, on a simulated cell at max speed.

Nothing here is a shortcut around the real path: an embedded broker, an
agent on a simulated channel and the Prefect flow run exactly as they would
for a bench instrument, so a dry-run finds what a real run would hit.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from labtwin.analysis.plots import plot_nyquist, plot_plateau, plot_run, plot_voltammograms
from labtwin.analysis.summary import RunSummary
from labtwin.cli.progress import Mode, follow_progress
from labtwin.cli.wiring import LocalLab, default_lab
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.data.export import export_samples
from labtwin.documents import Anomaly, StepKind
from labtwin.physics.library import load_cell


async def run_dryrun(
    protocol: str,
    sim: str,
    out: Path | None,
    channel: str | None = None,
    lab_file: Path | None = None,
    twin: bool = True,
    speed: float | str = "max",
    progress: Mode = "off",
    progress_console: Console | None = None,
    twin_model: str | None = None,
) -> tuple[RunSummary, list[Anomaly]]:
    """Returns the run's summary and what the twin flagged while following it.

    At max speed the simulated cell runs ahead of the twin that follows it, so
    a pause or stop the protocol asks for on an anomaly lands late in cell time
    (it acts within a sample in real time). A finite ``speed`` shows where it
    would land on a real channel, at the cost of wall time.

    ``progress``: how the run's progress shows on ``progress_console`` (labtwin.cli.progress).

    ``twin_model``: the cell definition the twin runs in the loop (default: ``sim`` itself). A simulated cell
    with a seeded fault (a soft short, a contact going bad) followed by a twin of its healthy definition is
    how a dry-run shows whether the twin catches that fault (bench/false_alarms.py).
    """
    from labtwin.orchestration.flows import begin_prefect_api, run_protocol, start_prefect_api

    cell = load_cell(sim)
    stands_for: str | None = None
    if channel is not None:
        lab_channel = default_lab(lab_file).channel(channel)
        limits = lab_channel.limits
        # The simulated channel stands for that channel's instrument: a 2450's compliance, not a clamp at the
        # cut-off, so the dry-run ends the steps the bench will end, for the same reasons (issue 14).
        stands_for = lab_channel.driver if lab_channel.driver != "simulated" else lab_channel.stands_for
    else:
        # A simulated channel's hard limits: the cell's operating window plus 5 % of its span each side,
        # so a protocol's own safety limits (just outside the window) are the ones that act.
        lo, hi = cell.voltage_window_V
        margin = 0.05 * (hi - lo)
        from labtwin.documents import Limits

        limits = Limits(voltage_min_V=lo - margin, voltage_max_V=hi + margin)
    config = LabConfig(
        lab="dryrun",
        channels={
            "sim": ChannelConfig(
                driver="simulated",
                cell=sim,
                twin_model=twin_model,
                cell_id=f"dryrun-{cell.name}",
                speed=speed,
                seed=0,
                limits=limits,
                stands_for=stands_for,
            )
        },
    )
    store_url = ":memory:" if out is None else str(out / "dryrun.db")
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            Path(store_url).unlink(missing_ok=True)
        except OSError as exc:
            from labtwin.cli.errors import UserError

            raise UserError(
                f"--out {out}: cannot be written ({exc.strerror or exc}): give a writable directory"
            ) from None
    begin_prefect_api()  # imports and starts in its own process while the broker, agent and twin come up
    async with LocalLab(config, ["sim"], None, store_url, "config", twin=twin) as local:
        await start_prefect_api()
        async with follow_progress(local.url, config.lab, progress, progress_console or Console(stderr=True), ["sim"]):
            summary = await run_protocol(protocol, "sim", local.url, lab=config.lab)
        await local.wait_stored(summary.run_id)
        anomalies: list[Anomaly] = []
        if local.twin_service is not None:
            await local.twin_service.wait_run_followed(summary.run_id, timeout_s=600.0)
            anomalies = [a for a in local.twin_service.anomalies if a.run_id == summary.run_id]
            # The recorder stores anomalies from the bus too: wait until it has them all, so the store a
            # dry-run leaves behind (--out) says what the report says.
            import asyncio
            import time

            deadline = time.monotonic() + 30.0
            store = local.store
            while (
                store is not None
                and len(store.anomalies(summary.run_id)) < len(anomalies)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
        if out is not None:
            write_outputs(local.store, summary, out, f"{cell.name} · {summary.protocol}")
            if twin:
                (out / "anomalies.json").write_text(
                    json.dumps([a.model_dump(mode="json") for a in anomalies], indent=2)
                )
    return summary, anomalies


def write_outputs(store, summary: RunSummary, out: Path, title: str) -> list[Path]:
    """samples.csv, eis.csv, summary.json and the plots a lab looks at first.

    The cycle column is the samples' own: the electrochemical cycle every
    output of the run carries (labtwin.analysis.cycles), as the store has it.
    """
    events = store.step_events(summary.run_id)
    samples = store.samples(summary.run_id)
    written = [export_samples(samples, out / "samples.csv", "csv")]
    impedance = store.impedance(summary.run_id)
    if len(impedance["frequency_Hz"]):
        columns = {k: impedance[k] for k in ("frequency_Hz", "z_real_ohm", "z_imag_ohm", "step", "cycle")}
        written.append(export_samples(columns, out / "eis.csv", "csv"))
        spectra = []
        for step in dict.fromkeys(impedance["step"].tolist()):
            mask = impedance["step"] == step
            spectra.append(
                (
                    f"cycle {impedance['cycle'][mask][0]} (step {step})",
                    impedance["z_real_ohm"][mask],
                    impedance["z_imag_ohm"][mask],
                )
            )
        written.append(plot_nyquist(spectra, title, out / "nyquist.png"))
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary.model_dump(), indent=2, default=str))
    written.append(summary_path)
    if len(samples["time_s"]):
        written.append(plot_run(samples, title, out / "run.png"))
        sweeps = [
            (ev.label or f"step {ev.step_index}", ev.step_index)
            for ev in events
            if ev.step == StepKind.cyclic_voltammetry
        ]
        if sweeps:
            curves = [
                (label, samples["voltage_V"][samples["step"] == k], samples["current_A"][samples["step"] == k])
                for label, k in sweeps
            ]
            written.append(plot_voltammograms(curves, title, out / "cv.png"))
        galvanostatic = [ev for ev in events if ev.step == StepKind.cc and ev.stats and ev.stats.n_samples > 50]
        if galvanostatic:
            first = galvanostatic[0]
            mask = samples["step"] == first.step_index
            plateau = plot_plateau(
                samples["capacity_Ah"][mask],
                samples["voltage_V"][mask],
                f"{title}: plateau of step {first.step_index} ({first.label})",
                out / "plateau.png",
            )
            if plateau is not None:
                written.append(plateau)
    return written
