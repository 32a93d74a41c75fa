"""Impedance analysis: circuit strings, CNLS fits with guesses from the data, the distribution of relaxation
times, Lin-KK, spectrum files."""

from labtwin.analysis.eis.circuit import Circuit, CircuitError, parse_circuit
from labtwin.analysis.eis.drt import Drt, DrtPeak, fit_drt
from labtwin.analysis.eis.files import Spectrum, SpectrumFileError, read_spectra
from labtwin.analysis.eis.fit import CircuitFit, fit_circuit, initial_guess
from labtwin.analysis.eis.linkk import LinKK, lin_kk

__all__ = [
    "Circuit",
    "CircuitError",
    "CircuitFit",
    "Drt",
    "DrtPeak",
    "LinKK",
    "Spectrum",
    "SpectrumFileError",
    "fit_circuit",
    "fit_drt",
    "initial_guess",
    "lin_kk",
    "parse_circuit",
    "read_spectra",
]
