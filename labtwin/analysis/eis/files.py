"""Readers for impedance spectra as labs have them on disk.

- ZPlot/ZView ``.z`` text (Scribner): a header up to ``End Comments``, then
  tab-separated rows Freq, Ampl, Bias, Time, Z', Z'', GD, Err, Range.
- CSV: three columns f, Z', Z'' without a header (impedance.py's readCSV
  layout), or any CSV with a header naming frequency and real/imaginary
  columns (labtwin's own eis.csv, with a ``step`` column that separates the
  spectra of one run).

Z'' is kept with its sign as measured (negative for capacitive arcs); plots
show -Z''.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Spectrum:
    frequency_Hz: np.ndarray
    impedance_ohm: np.ndarray
    label: str = ""


class SpectrumFileError(ValueError):
    pass


def read_zplot(path: str | Path) -> Spectrum:
    path = Path(path)
    lines = path.read_text(errors="replace").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "end comments") + 1
    except StopIteration as exc:
        raise SpectrumFileError(f"{path}: no 'End Comments' line; is this a ZPlot .z file?") from exc
    rows = []
    for number, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) < 6:
            raise SpectrumFileError(
                f"{path}:{number}: expected Freq, Ampl, Bias, Time, Z', Z'' ... got {len(fields)} fields"
            )
        rows.append((float(fields[0]), float(fields[4]), float(fields[5])))
    data = np.array(rows, dtype=float)
    return Spectrum(data[:, 0], data[:, 1] + 1j * data[:, 2], path.stem)


_FREQ = ("frequency_hz", "freq/hz", "frequency", "freq", "f")
_REAL = ("z_real_ohm", "re(z)/ohm", "z'", "zreal", "z_real", "zre", "real")
_IMAG = ("z_imag_ohm", "-im(z)/ohm", "im(z)/ohm", "z''", "zimag", "z_imag", "zim", "imag")


def _find(header: list[str], names: tuple[str, ...], what: str, path: Path) -> int:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise SpectrumFileError(f"{path}: no {what} column; header is {header}; name it one of {list(names)}")


def read_csv(path: str | Path) -> list[Spectrum]:
    """One spectrum, or one per ``step`` when the file has a step column (labtwin's eis.csv)."""
    path = Path(path)
    with path.open(newline="") as handle:
        rows = [r for r in csv.reader(handle) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise SpectrumFileError(f"{path}: empty file")
    try:
        [float(x) for x in rows[0][:3]]
        header = None
    except ValueError:
        header = rows[0]
        rows = rows[1:]
    if header is None:
        fi, ri, ii, si, ci = 0, 1, 2, None, None
        negate = False
    else:
        fi = _find(header, _FREQ, "frequency", path)
        ri = _find(header, _REAL, "real-part", path)
        ii = _find(header, _IMAG, "imaginary-part", path)
        negate = header[ii].strip().lower().startswith("-im")
        lowered = [h.strip().lower() for h in header]
        si = lowered.index("step") if "step" in lowered else None
        ci = lowered.index("cycle") if "cycle" in lowered else None
    try:
        f = np.array([float(r[fi]) for r in rows])
        zr = np.array([float(r[ri]) for r in rows])
        zi = np.array([float(r[ii]) for r in rows])
    except (ValueError, IndexError) as exc:
        raise SpectrumFileError(f"{path}: a row is not numeric or is short: {exc}") from exc
    if negate:
        zi = -zi
    z = zr + 1j * zi
    if si is None:
        return [Spectrum(f, z, path.stem)]
    steps = np.array([int(float(r[si])) for r in rows])
    cycles = np.array([int(float(r[ci])) for r in rows]) if ci is not None else None
    spectra = []
    for s in dict.fromkeys(steps.tolist()):
        mask = steps == s
        label = f"cycle {cycles[mask][0]} (step {s})" if cycles is not None else f"step {s}"
        spectra.append(Spectrum(f[mask], z[mask], label))
    return spectra


def read_spectra(path: str | Path) -> list[Spectrum]:
    """Read any supported file by its extension."""
    path = Path(path)
    if not path.exists():
        raise SpectrumFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".z":
        return [read_zplot(path)]
    if suffix in (".csv", ".txt"):
        return read_csv(path)
    raise SpectrumFileError(
        f"{path}: unknown spectrum format {suffix!r}; labtwin reads .z (ZPlot) and .csv (f, Z', Z'')"
    )
