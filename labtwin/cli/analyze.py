"""`labtwin analyze ...` (also spelt `analyse`): the analysis functions on files, for a lab's own data as much as labtwin's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

analyze_app = typer.Typer(no_args_is_help=True, help="Analyse measured or simulated data files.")
console = Console()
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(2)


@analyze_app.command("eis")
def eis(
    file: Path = typer.Argument(..., help="a spectrum file: .z (ZPlot) or .csv (f, Z', Z''; labtwin's eis.csv)"),
    circuit: str = typer.Option("R0-p(R1,CPE1)-W1", "--circuit", "-c", help="equivalent circuit, impedance.py convention"),
    kk: bool = typer.Option(True, "--kk/--no-kk", help="run the Lin-KK validity test first"),
    kk_tolerance: float = typer.Option(0.01, "--kk-tolerance", help="largest Lin-KK residual, relative to |Z|, to call it valid"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write a Nyquist plot with the fits to this PNG"),
    as_json: bool = typer.Option(False, "--json", help="print results as JSON"),
) -> None:
    """Fit an equivalent circuit to every spectrum in FILE (CNLS, modulus weighting, guesses from the data)."""
    from labtwin.analysis.eis import CircuitError, SpectrumFileError, fit_circuit, lin_kk, parse_circuit, read_spectra

    try:
        parsed = parse_circuit(circuit)
        spectra = read_spectra(file)
    except (CircuitError, SpectrumFileError) as exc:
        _fail(str(exc))
    results = []
    for spectrum in spectra:
        fit = fit_circuit(parsed, spectrum.frequency_Hz, spectrum.impedance_ohm)
        entry: dict = {
            "spectrum": spectrum.label, "points": int(len(spectrum.frequency_Hz)), "circuit": parsed.text,
            "parameters": fit.parameters, "units": fit.units, "uncertainties": fit.standard_errors,
            "relative_rms": fit.relative_rms,
        }
        if kk:
            test = lin_kk(spectrum.frequency_Hz, spectrum.impedance_ohm)
            entry["lin_kk"] = {"valid": test.valid(kk_tolerance), "max_residual": test.max_residual,
                               "rms_residual": test.rms_residual, "n_elements": test.n_elements, "mu": test.mu}
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
            table.add_row("Lin-KK max residual", *[
                f"{'valid' if e['lin_kk']['valid'] else 'INVALID'} {e['lin_kk']['max_residual']:.2%}" for _, _, e in results
            ])
        console.print(table)
    if plot is not None:
        from labtwin.plots import plot_nyquist

        lines = []
        for spectrum, fit, _ in results:
            lines.append((spectrum.label, spectrum.impedance_ohm.real, spectrum.impedance_ohm.imag))
            f_fine = np.logspace(np.log10(spectrum.frequency_Hz.max()), np.log10(spectrum.frequency_Hz.min()), 200)
            z_fit = fit.impedance_ohm(f_fine)
            lines.append((f"fit {parsed.text}", z_fit.real, z_fit.imag))
        plot_nyquist(lines, f"{file.name}: {parsed.text}", plot)
        if not as_json:
            console.print(f"wrote {plot}")
