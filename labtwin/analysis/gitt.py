"""GITT: a Weppner-Huggins diffusion coefficient and the polarization of every pulse.

Each pulse of current I for tau seconds moves the relaxed (quasi-equilibrium)
voltage by dE_s (rest end before -> rest end after) and, during the pulse,
the voltage by dE_t (after the ohmic jump at its start, to its end). For
tau << L^2 / D (Weppner and Huggins, J. Electrochem. Soc. 124, 1977):

    D = 4 / (pi tau) * L^2 * (dE_s / dE_t)^2

with L the diffusion length, the host's volume over its area (a film's
thickness; a sphere's radius / 3). Each pulse reports tau D / L^2 so a
reader sees where the short-time condition holds.

Polarization per pulse is what the rest after it relaxes: the voltage at
the end of the pulse minus the relaxed voltage at the end of the rest (seed
003's bare LCO: 0.75 V rising to 1.33 V; glassy/ceramic: 0.21 V, flat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_PULSES = 3
MAX_PULSE_SHARE = 0.25  # of the charge moved in its direction: a titration step, not a half cycle


class NotGittError(ValueError):
    """A recording whose current pulses are not a GITT: too few, or each a whole half cycle."""


@dataclass
class GittPulse:
    index: int
    start_time_s: float
    duration_s: float
    current_A: float
    relaxed_before_V: float
    pulse_end_V: float
    relaxed_after_V: float
    ohmic_drop_V: float
    steady_state_change_V: float
    transient_change_V: float
    polarization_V: float
    diffusivity_m2_s: float | None
    short_time_ratio: float | None  # tau D / L^2: Weppner-Huggins wants it well below 1


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index ranges, end exclusive, where mask is True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]))


def gitt_pulses(
    time_s, voltage_V, current_A, length_m: float | None = None, rest_fraction: float = 0.02
) -> list[GittPulse]:
    """Every current pulse that has a rest before and after it; ``length_m`` enables D."""
    t = np.asarray(time_s, dtype=float)
    v = np.asarray(voltage_V, dtype=float)
    i = np.asarray(current_A, dtype=float)
    if len(t) < 4:
        raise ValueError("GITT needs samples through at least one pulse and its rests")
    threshold = rest_fraction * float(np.max(np.abs(i)))
    pulses = _runs(np.abs(i) > threshold)
    rests = _runs(np.abs(i) <= threshold)
    out = []
    for k, (start, end) in enumerate(pulses):
        before = [r for r in rests if r[1] <= start]
        after = [r for r in rests if r[0] >= end]
        if not before or not after or end - start < 2:
            continue
        rest_after = after[0]
        relaxed_before = float(v[before[-1][1] - 1])
        relaxed_after = float(v[rest_after[1] - 1])
        tau = float(t[end - 1] - t[start - 1]) if start > 0 else float(t[end - 1] - t[start])
        first, last = float(v[start]), float(v[end - 1])
        d_es = abs(relaxed_after - relaxed_before)
        d_et = abs(last - first)
        d, ratio = None, None
        if length_m is not None and d_et > 0 and tau > 0:
            d = 4.0 / (math.pi * tau) * length_m**2 * (d_es / d_et) ** 2
            ratio = tau * d / length_m**2
        out.append(
            GittPulse(
                index=k,
                start_time_s=float(t[start]),
                duration_s=tau,
                current_A=float(np.mean(i[start:end])),
                relaxed_before_V=relaxed_before,
                pulse_end_V=last,
                relaxed_after_V=relaxed_after,
                ohmic_drop_V=first - relaxed_before,
                steady_state_change_V=d_es,
                transient_change_V=d_et,
                polarization_V=abs(relaxed_after - last),
                diffusivity_m2_s=d,
                short_time_ratio=ratio,
            )
        )
    return out


def check_gitt(pulses: list[GittPulse]) -> None:
    """Raise NotGittError unless the pulses look like a titration: several short pulses with rests between,
    each moving a small share of the charge its direction moved. A cycling file with rests between its half
    cycles has two or so "pulses" that are whole half cycles; Weppner-Huggins on those is meaningless."""
    if len(pulses) < MIN_PULSES:
        raise NotGittError(
            f"{len(pulses)} current pulse(s) with a rest before and after: GITT is a series of short pulses "
            f"(at least {MIN_PULSES}) with rests between; is this a GITT recording?"
        )
    charge = np.array([abs(p.current_A) * p.duration_s for p in pulses])
    sign = np.sign([p.current_A for p in pulses])
    share = np.array([c / charge[sign == s].sum() for c, s in zip(charge, sign)])
    if float(np.median(share)) > MAX_PULSE_SHARE:
        raise NotGittError(
            f"each of its {len(pulses)} pulses moves {np.median(share):.0%} (median) of the charge of its "
            f"direction: these are half cycles with rests, not GITT pulses (each a small share of the capacity)"
        )
