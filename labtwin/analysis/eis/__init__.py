"""Impedance analysis: circuit strings, CNLS fits with guesses from the data, Lin-KK, spectrum files."""

from labtwin.analysis.eis.circuit import Circuit, CircuitError, parse_circuit
from labtwin.analysis.eis.files import Spectrum, SpectrumFileError, read_spectra
from labtwin.analysis.eis.fit import CircuitFit, fit_circuit, initial_guess
from labtwin.analysis.eis.linkk import LinKK, lin_kk

__all__ = [
    "Circuit",
    "CircuitError",
    "CircuitFit",
    "LinKK",
    "Spectrum",
    "SpectrumFileError",
    "fit_circuit",
    "initial_guess",
    "lin_kk",
    "parse_circuit",
    "read_spectra",
]
