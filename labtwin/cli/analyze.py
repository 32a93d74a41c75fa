"""`labtwin analyze ...` (also spelt `analyse`): the analysis functions on files, for a lab's own data as much as labtwin's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from labtwin.cli.consoles import results_console
from labtwin.cli.options import LabOpt, StoreOpt

if TYPE_CHECKING:  # numpy is imported by the functions that compute: the analyze app is built for every command
    import numpy as np

analyze_app = typer.Typer(no_args_is_help=True, help="Analyse measured or simulated data files.")
console = results_console()
err = Console(stderr=True)


def _fail(message: str) -> NoReturn:
    from labtwin.cli.errors import UserError

    raise UserError(message)  # one line on stderr, exit 2 (labtwin.cli.errors)


@analyze_app.command("eis")
def eis(
    file: Path = typer.Argument(..., help="a spectrum file: .z (ZPlot) or .csv (f, Z', Z''; labtwin's eis.csv)"),
    circuit: str = typer.Option(
        "R0-p(R1,CPE1)-W1", "--circuit", "-c", help="equivalent circuit, impedance.py convention"
    ),
    kk: bool = typer.Option(True, "--kk/--no-kk", help="run the Lin-KK validity test first"),
    drt: bool = typer.Option(
        True, "--drt/--no-drt", help="the distribution of relaxation times beside the fit (Tikhonov NNLS, GCV)"
    ),
    kk_tolerance: float = typer.Option(
        0.01, "--kk-tolerance", help="largest Lin-KK residual, relative to |Z|, to call it valid"
    ),
    plot: Path | None = typer.Option(None, "--plot", help="write a Nyquist plot with the fits to this PNG"),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Fit an equivalent circuit to every spectrum in FILE (CNLS, modulus weighting, guesses from the data)."""
    from labtwin.analysis.eis import (
        CircuitError,
        SpectrumFileError,
        fit_circuit,
        fit_drt,
        lin_kk,
        parse_circuit,
        read_spectra,
    )

    try:
        parsed = parse_circuit(circuit)
        spectra = read_spectra(file)
    except (CircuitError, SpectrumFileError) as exc:
        _fail(str(exc))
    results = []
    for spectrum in spectra:
        try:
            fit = fit_circuit(parsed, spectrum.frequency_Hz, spectrum.impedance_ohm)
        except ValueError as exc:  # too few points to fit, or none that can be fitted
            _fail(f"{file}: spectrum {spectrum.label!r} ({len(spectrum.frequency_Hz)} points): {exc}")
        entry: dict = {
            "spectrum": spectrum.label,
            "points": int(len(spectrum.frequency_Hz)),
            "circuit": parsed.text,
            "parameters": fit.parameters,
            "units": fit.units,
            "uncertainties": fit.standard_errors,
            "relative_rms": fit.relative_rms,
            "undetermined": fit.undetermined(),
        }
        if drt:
            try:
                found = fit_drt(spectrum.frequency_Hz, spectrum.impedance_ohm)
            except ValueError as exc:
                entry["drt"] = {"error": str(exc)}
            else:
                entry["drt"] = {
                    "regularisation": found.regularisation,
                    "relative_rms": found.relative_rms,
                    "r_inf_ohm": found.r_inf_ohm,
                    "peaks": [vars(p) for p in found.peaks],
                }
        if kk:
            test = lin_kk(spectrum.frequency_Hz, spectrum.impedance_ohm)
            entry["lin_kk"] = {
                "valid": test.valid(kk_tolerance),
                "max_residual": test.max_residual,
                "rms_residual": test.rms_residual,
                "n_elements": test.n_elements,
                "mu": test.mu,
            }
        results.append((spectrum, fit, entry))
    if as_json:
        # One spectrum: its object. Several (a run's eis.csv): {"circuit", "spectra": [objects]}.
        entries = [e for _, _, e in results]
        payload = entries[0] if len(entries) == 1 else {"circuit": parsed.text, "spectra": entries}
        print(json.dumps(payload, indent=2, default=float))
    else:
        # One row per parameter, one column per spectrum: a trend across spectra reads left to right.
        table = Table(title=f"{file.name}: {parsed.text}")
        table.add_column("parameter")
        for _, _, entry in results:
            table.add_column(entry["spectrum"], justify="right")
        for name, unit in zip(parsed.parameter_names, parsed.parameter_units):
            row = [f"{name} / {unit}" if unit else name]
            for _, fit, _ in results:
                row.append(f"{fit.parameters[name]:.4g} ±{fit.standard_errors[name]:.1g}")
            table.add_row(*row)
        table.add_row("fit RMS / |Z|", *[f"{fit.relative_rms:.2%}" for _, fit, _ in results])
        if kk:
            table.add_row(
                "Lin-KK max residual",
                *[
                    f"{'valid' if e['lin_kk']['valid'] else 'INVALID'} {e['lin_kk']['max_residual']:.2%}"
                    for _, _, e in results
                ],
            )
        console.print(table)
        for spectrum, _, entry in results:
            peaks = entry.get("drt", {}).get("peaks", [])
            if peaks:
                console.print(
                    f"DRT of {spectrum.label!r} (lambda {entry['drt']['regularisation']:.2g} by GCV): "
                    + ", ".join(
                        f"{p['resistance_ohm']:.4g} ohm at tau {p['tau_s']:.3g} s ({p['frequency_Hz']:.3g} Hz)"
                        for p in peaks
                    )
                )
        for spectrum, fit, _ in results:
            for name in fit.undetermined():
                console.print(
                    f"warning: spectrum {spectrum.label!r}: {name} = {fit.parameters[name]:.4g} "
                    f"±{fit.standard_errors[name]:.2g} is not determined by the data (error above half the value); "
                    "a simpler circuit or more low-frequency points would pin it down"
                )
    if plot is not None:
        import numpy as np

        from labtwin.analysis.plots import plot_nyquist

        lines = []
        for spectrum, fit, _ in results:
            lines.append((spectrum.label, spectrum.impedance_ohm.real, spectrum.impedance_ohm.imag))
            f_fine = np.logspace(np.log10(spectrum.frequency_Hz.max()), np.log10(spectrum.frequency_Hz.min()), 200)
            z_fit = fit.impedance_ohm(f_fine)
            lines.append((f"fit {parsed.text}", z_fit.real, z_fit.imag))
        plot_nyquist(lines, f"{file.name}: {parsed.text}", plot)
        if not as_json:
            console.print(f"wrote {plot}", soft_wrap=True)


def _is_sweep(voltage_V: np.ndarray, current_A: np.ndarray) -> bool:
    """A CV step: the potential moves in even steps (a ramp or staircase) over 50 mV or more, and the current changes sign."""
    import numpy as np

    if len(voltage_V) < 20 or np.ptp(voltage_V) < 0.05 or not (np.any(current_A > 0) and np.any(current_A < 0)):
        return False
    moves = np.abs(np.diff(voltage_V))
    typical = float(np.median(moves))
    return typical > 0 and float(np.mean((moves > 0.5 * typical) & (moves < 2.0 * typical))) > 0.8


@analyze_app.command("cv")
def cv(
    files: list[Path] = typer.Argument(
        ...,
        help="CSV files with time_s, voltage_V, current_A (labtwin samples.csv: one voltammogram per step that sweeps)",
    ),
    series_resistance_ohm: float = typer.Option(0.0, "--series-resistance-ohm", help="iR correction: E = V - I R"),
    area_concentration: float | None = typer.Option(
        None, "--area-concentration", help="A*C in mol/m for Randles-Sevcik (film: Q/(F L))"
    ),
    cell: str | None = typer.Option(
        None, "--cell", help="take A*C and R from a simulated cell's film (labtwin/physics/cells)"
    ),
    electrons: int = typer.Option(1, "--electrons", "-n"),
    plot: Path | None = typer.Option(None, "--plot", help="write the voltammograms with their peaks to this PNG"),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Peaks and peak separation per voltammogram; Randles-Sevcik D over the linear range when 3+ rates and A*C are given."""
    from labtwin.analysis.cv import randles_sevcik, voltammogram
    from labtwin.formats import RecordingError, read_recording

    if cell is not None:
        from labtwin.physics.library import load_cell  # the CLI is where labtwin meets the simulators

        definition = load_cell(cell)
        film = getattr(definition.parameters, "positive", None)  # an equivalent-circuit cell has no electrodes
        diffusion = getattr(film, "diffusion", None)
        if film is None or diffusion is None or diffusion.geometry != "planar":
            _fail(f"--cell {cell}: its positive electrode is not a planar film; give --area-concentration instead")
        area_concentration = film.capacity_Ah * 3600.0 / 96485.33212 / diffusion.length_m
        series_resistance_ohm = series_resistance_ohm or definition.parameters.series_resistance_ohm
    sweeps, curves = [], []
    for path in files:
        try:
            rec = read_recording(path)
        except RecordingError as exc:
            _fail(str(exc))
        for step in dict.fromkeys(rec.step.tolist()):
            mask = rec.step == step
            v, i, t = rec.voltage_V[mask], rec.current_A[mask], rec.time_s[mask]
            if not _is_sweep(v, i):
                continue  # not a sweep: a rest, a hold, a galvanostatic step
            sweeps.append((f"{path.stem} step {step}", voltammogram(v - i * series_resistance_ohm, i, t)))
            curves.append((v - i * series_resistance_ohm, i))
    if not sweeps:
        _fail("no voltammogram found: a CV step sweeps the potential and the current changes sign")
    result: dict = {
        "voltammograms": [
            {
                "name": name,
                "scan_rate_V_s": vg.scan_rate_V_s,
                "peak_separation_V": vg.peak_separation_V,
                "anodic_peak": vars(vg.anodic) if vg.anodic else None,
                "cathodic_peak": vars(vg.cathodic) if vg.cathodic else None,
                "peaks": [vars(p) for p in vg.peaks],
            }
            for name, vg in sweeps
        ]
    }
    usable = [(vg.scan_rate_V_s, vg.anodic.current_A) for _, vg in sweeps if vg.anodic is not None]
    if area_concentration is not None and len({r for r, _ in usable}) >= 3:
        rs = randles_sevcik([r for r, _ in usable], [p for _, p in usable], area_concentration, electrons)
        result["randles_sevcik"] = {
            "diffusivity_m2_s": rs.diffusivity_m2_s,
            "r_squared": rs.r_squared,
            "linear_range_V_s": list(rs.linear_range_V_s),
            "rates_used": rs.rates_used,
            "slope_A_per_sqrt_V_s": rs.slope_A_per_sqrt_V_s,
        }
    if plot is not None:
        from labtwin.analysis.plots import plot_voltammograms

        plot_voltammograms(
            [(f"{vg.scan_rate_V_s * 1e3:.3g} mV/s", e, i) for (_, vg), (e, i) in zip(sweeps, curves)],
            "voltammograms" + (" (iR-corrected)" if series_resistance_ohm else ""),
            plot,
        )
    if as_json:
        print(json.dumps(result, indent=2, default=float))
        return
    table = Table(title="voltammograms")
    for col in ("sweep", "rate / mV/s", "E_pa / V", "E_pc / V", "dE_p / mV", "i_pa", "i_pc", "peaks"):
        table.add_column(col, justify="right")
    for name, vg in sweeps:
        table.add_row(
            name,
            f"{vg.scan_rate_V_s * 1e3:.3g}",
            f"{vg.anodic.potential_V:.4f}" if vg.anodic else "",
            f"{vg.cathodic.potential_V:.4f}" if vg.cathodic else "",
            f"{vg.peak_separation_V * 1e3:.1f}" if vg.peak_separation_V is not None else "",
            f"{vg.anodic.current_A:.4g}" if vg.anodic else "",
            f"{vg.cathodic.current_A:.4g}" if vg.cathodic else "",
            str(len(vg.peaks)),
        )
    console.print(table)
    if "randles_sevcik" in result:
        r = result["randles_sevcik"]
        console.print(
            f"Randles-Sevcik: D = {r['diffusivity_m2_s']:.3g} m2/s (R^2 {r['r_squared']:.4f}, linear from "
            f"{r['linear_range_V_s'][0] * 1e3:.3g} to {r['linear_range_V_s'][1] * 1e3:.3g} mV/s, {r['rates_used']} rates)"
        )


@analyze_app.command("gitt")
def gitt(
    file: Path = typer.Argument(
        ..., help="a recording with the GITT pulses: labtwin samples.csv, BDF csv or EC-Lab .mpr"
    ),
    length_m: float | None = typer.Option(
        None, "--length-m", help="diffusion length: film thickness, or particle radius / 3"
    ),
    cell: str | None = typer.Option(
        None, "--cell", help="take the diffusion length from a simulated cell (labtwin/physics/cells)"
    ),
    plot: Path | None = typer.Option(
        None, "--plot", help="write polarization and D against the relaxed voltage to this PNG"
    ),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Weppner-Huggins D and polarization for every pulse that has a rest before and after it."""
    import numpy as np

    from labtwin.analysis.gitt import check_gitt, gitt_pulses
    from labtwin.formats import RecordingError, read_recording

    if cell is not None and length_m is None:
        from labtwin.physics.library import load_cell  # the CLI is where labtwin meets the simulators

        diffusion = getattr(getattr(load_cell(cell).parameters, "positive", None), "diffusion", None)
        if diffusion is None:
            _fail(f"--cell {cell}: its positive electrode has no solid diffusion; give --length-m")
        length_m = diffusion.length_m / 3.0 if diffusion.geometry == "spherical" else diffusion.length_m
    try:
        rec = read_recording(file)
    except RecordingError as exc:
        _fail(str(exc))
    try:
        pulses = gitt_pulses(rec.time_s, rec.voltage_V, rec.current_A, length_m)
        check_gitt(pulses)
    except ValueError as exc:  # too few samples, or not a GITT (NotGittError)
        _fail(f"{file}: {exc}")
    if plot is not None:
        import matplotlib.pyplot as plt

        fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(10, 4))
        relaxed = [p.relaxed_after_V for p in pulses]
        ax_p.plot(relaxed, [p.polarization_V for p in pulses], "o-", ms=3)
        ax_p.set_xlabel("relaxed voltage / V")
        ax_p.set_ylabel("polarization / V")
        if length_m:
            ax_d.semilogy(relaxed, [p.diffusivity_m2_s for p in pulses], "o-", ms=3)
            ax_d.set_ylabel("D (Weppner-Huggins) / m2/s")
        ax_d.set_xlabel("relaxed voltage / V")
        fig.suptitle(file.name)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
        plt.close(fig)
    if as_json:
        print(json.dumps({"length_m": length_m, "pulses": [vars(p) for p in pulses]}, indent=2, default=float))
        return
    table = Table(title=f"{file.name}: {len(pulses)} GITT pulses" + (f", L = {length_m:.3g} m" if length_m else ""))
    for col in (
        "pulse",
        "start / h",
        "I / A",
        "relaxed / V",
        "dE_s / mV",
        "dE_t / mV",
        "polarization / V",
        "D / m2/s",
        "tau D / L2",
    ):
        table.add_column(col, justify="right")
    for p in pulses:
        table.add_row(
            str(p.index),
            f"{p.start_time_s / 3600:.2f}",
            f"{p.current_A:.3g}",
            f"{p.relaxed_after_V:.4f}",
            f"{p.steady_state_change_V * 1e3:.2f}",
            f"{p.transient_change_V * 1e3:.2f}",
            f"{p.polarization_V:.3f}",
            "" if p.diffusivity_m2_s is None else f"{p.diffusivity_m2_s:.3g}",
            "" if p.short_time_ratio is None else f"{p.short_time_ratio:.2f}",
        )
    console.print(table)
    console.print(
        f"mean polarization {np.mean([p.polarization_V for p in pulses]):.3f} V"
        + ("; Weppner-Huggins holds where tau D / L2 << 1" if length_m else "")
    )


@analyze_app.command("cycling")
def cycling(
    source: str = typer.Argument(..., help="a run id (or unique prefix) in the store, or a recording file"),
    store: str | None = StoreOpt,
    lab: Path | None = LabOpt,
    plot: Path | None = typer.Option(
        None,
        "--plot",
        help="write the cycling plots into this directory: capacity-ce.png, voltage-capacity.png, dqdv.png, "
        "voltage-current-time.png (a path ending in .png: dQ/dV alone, to that file)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Per-cycle charge and discharge capacity, Coulombic efficiency, energy and mean polarization."""
    from labtwin.analysis.cycles import summarize_cycles
    from labtwin.data.replay import documents
    from labtwin.documents import StepEvent
    from labtwin.formats import RecordingError, read_recording

    if plot is not None and plot.exists() and not plot.is_dir() and plot.suffix.lower() != ".png":
        _fail(f"--plot {plot}: is a file; give a directory for the plots")
    path = Path(source)
    if path.exists():
        try:
            rec = read_recording(path)
        except RecordingError as exc:
            _fail(str(exc))
        events = [
            d
            for d in documents(rec, lab="analysis", channel="file", cell_id=path.stem)
            if isinstance(d, StepEvent) and d.event == "ended"
        ]
        # documents() numbers the cycles of a file that has none (rec.cycle), so the samples carry them too.
        samples = {
            "time_s": rec.time_s,
            "voltage_V": rec.voltage_V,
            "current_A": rec.current_A,
            "capacity_Ah": rec.capacity_Ah,
            "step": _step_indices(rec.step),
            "cycle": rec.cycle,
        }
        title = _recording_title(path)
    else:
        from labtwin.cli import settings  # --store, LABTWIN_STORE, the lab file's store:, the default
        from labtwin.cli.wiring import open_store

        s = open_store(settings(lab=lab, store=store).store)
        try:
            run_id = s.find_run(source)
        except KeyError as exc:
            _fail(f"{source!r} is neither a file nor a run in the store: {exc.args[0]}")
        events = s.step_events(run_id)
        samples = s.samples(run_id)
        start, _ = s.run_documents(run_id)
        title = f"{start.cell_id} · {start.protocol}" if start is not None else run_id
    cycles = summarize_cycles(events)
    rows = [
        {**c.model_dump(), "mean_polarization_V": c.mean_polarization_V if c.coulombic_efficiency is not None else None}
        for c in cycles
    ]
    written: list[Path] = []
    if plot is not None:
        from labtwin.analysis.plots import dqdv_figure, plot_cycling, save_figure

        try:
            if plot.suffix.lower() == ".png" and not plot.is_dir():
                written = [save_figure(dqdv_figure(samples, events, title), plot)]
            else:
                written = list(plot_cycling(samples, events, title, plot).values())
        except OSError as exc:
            _fail(f"--plot {plot}: cannot be written ({exc.strerror or exc}): give a writable directory")
    if as_json:
        print(json.dumps({"cycles": rows, "plots": [str(p) for p in written]}, indent=2, default=float))
        return
    table = Table(title=f"{title}: {len(rows)} cycles")
    for col in (
        "cycle",
        "charge / mAh",
        "discharge / mAh",
        "CE / %",
        "energy in / mWh",
        "energy out / mWh",
        "polarization / V",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["cycle"]),
            f"{r['charge_Ah'] * 1e3:.4g}",
            f"{r['discharge_Ah'] * 1e3:.4g}",
            "" if r["coulombic_efficiency"] is None else f"{100 * r['coulombic_efficiency']:.2f}",
            f"{r['energy_in_Wh'] * 1e3:.4g}",
            f"{r['energy_out_Wh'] * 1e3:.4g}",
            "" if r["mean_polarization_V"] is None else f"{r['mean_polarization_V']:.3f}",
        )
    console.print(table)
    for written_path in written:
        console.print(f"wrote {written_path}", soft_wrap=True)


def _recording_title(path: Path) -> str:
    """The cell and protocol of a recording: from the summary.json `dryrun --out` writes beside its
    samples.csv, else the file's name (a cycler's file names neither)."""
    summary = path.parent / "summary.json"
    if path.name == "samples.csv" and summary.is_file():
        try:
            meta = json.loads(summary.read_text())
            return f"{meta['cell_id']} · {meta['protocol']}"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return path.name


def _step_indices(recorded_step: np.ndarray) -> np.ndarray:
    """Replay numbers steps 0, 1, 2, ... each time the recorded step changes; the same here, per sample."""
    import numpy as np

    return np.concatenate([[0], np.cumsum(np.diff(recorded_step) != 0)]).astype(int)
