"""PNG plots of a run: voltage against time and voltage against charge, per cell."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_run(samples: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """V-t and V-Q side by side; Q is the net charge since the run started (positive = charged in).

    One V-Q line per electrochemical cycle, as the samples carry it (labtwin.analysis.cycles); cycle 0 is
    what came before any current flowed (an initial rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_q) = plt.subplots(1, 2, figsize=(11, 4.2))
    t_h = samples["time_s"] / 3600.0
    q_mAh = samples["capacity_Ah"] * 1e3
    ax_t.plot(t_h, samples["voltage_V"], lw=0.8)
    ax_t.set_xlabel("time / h")
    ax_t.set_ylabel("voltage / V")
    ax_t.set_title("V-t")
    cycles = samples["cycle"]
    for cycle in np.unique(cycles):
        mask = cycles == cycle
        ax_q.plot(
            q_mAh[mask], samples["voltage_V"][mask], lw=0.8, label=f"cycle {cycle}" if cycle else "before cycle 1"
        )
    ax_q.set_xlabel("net charge since start / mAh (positive = charged)")
    ax_q.set_ylabel("voltage / V")
    ax_q.set_title("V-Q")
    if len(np.unique(cycles)) <= 12:
        ax_q.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_nyquist(spectra: list[tuple[str, np.ndarray, np.ndarray]], title: str, path: Path) -> Path:
    """-Z'' against Z' with equal axes (arcs stay round), one line per spectrum: (label, Z'_ohm, Z''_ohm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(spectra), 1)))
    for (label, z_real, z_imag), color in zip(spectra, colors):
        ax.plot(z_real, -z_imag, "o-", ms=2.5, lw=0.8, color=color, label=label)
    ax.set_xlabel("Z' / ohm")
    ax.set_ylabel("-Z'' / ohm")
    # A blocking (capacitive) tail can reach 100x the arcs' size: frame the arcs with equal axes and let the
    # tail leave the frame, saying so, rather than squash the arcs into a line.
    re_all = np.concatenate([np.real(r) for _, r, _ in spectra]) if spectra else np.zeros(1)
    im_all = np.concatenate([-np.asarray(i) for _, _, i in spectra]) if spectra else np.zeros(1)
    lo, hi = float(np.min(re_all)), float(np.max(re_all))
    span = max(hi - lo, 1e-9) * 1.08
    left = lo - 0.04 * span
    top = max(span, float(np.max(np.clip(im_all, 0, None))) if float(np.max(im_all)) < 1.5 * span else span)
    ax.set_xlim(left, left + max(span, top))
    ax.set_ylim(min(0.0, float(np.min(im_all))) - 0.04 * span, top)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    if len(spectra) <= 12:
        ax.legend(fontsize=7)
    clipped = float(np.max(im_all)) > top
    ax.set_title(title + ("\n(low-frequency tail beyond the frame)" if clipped else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _si_scale(values: np.ndarray, unit: str) -> tuple[float, str]:
    """A factor and label so the largest value reads between 1 and 1000 (micro-meniscus CVs are in pA)."""
    peak = float(np.max(np.abs(values))) if len(values) else 0.0
    for factor, prefix in ((1.0, ""), (1e3, "m"), (1e6, "u"), (1e9, "n"), (1e12, "p"), (1e15, "f")):
        if peak * factor >= 1.0:
            return factor, prefix + unit
    return 1e15, "f" + unit


def plot_voltammograms(sweeps: list[tuple[str, np.ndarray, np.ndarray]], title: str, path: Path) -> Path:
    """Current against potential, one line per sweep step: (label, voltage_V, current_A)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    factor, unit = _si_scale(np.concatenate([c for _, _, c in sweeps]) if sweeps else np.zeros(0), "A")
    for label, voltage_V, current_A in sweeps:
        ax.plot(voltage_V, current_A * factor, lw=0.9, label=label)
    ax.set_xlabel("voltage / V")
    ax.set_ylabel(f"current / {unit}")
    ax.axhline(0.0, color="0.6", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_plateau(
    capacity_Ah: np.ndarray, voltage_V: np.ndarray, title: str, path: Path, band_V: float = 0.03
) -> Path | None:
    """The flat part of one galvanostatic step at millivolt scale, where plateau oscillations show.

    Whole-run plots squeeze a 2 mV oscillation into a line; this zooms to
    +/- band_V around the step's median voltage, with the residual after a
    running mean below it. Returns None when the step has no plateau.
    """
    flat = np.abs(voltage_V - np.median(voltage_V)) < band_V
    if flat.sum() < 20:
        return None
    q = np.abs(capacity_Ah[flat] - capacity_Ah[0]) * 1e6
    v = voltage_V[flat]
    width = max(5, (len(v) // 10) | 1)
    trend = np.convolve(np.pad(v, width // 2, mode="edge"), np.ones(width) / width, mode="valid")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_v, ax_r) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    ax_v.plot(q, v, lw=0.8)
    ax_v.set_ylabel("voltage / V")
    ax_r.plot(q, (v - trend) * 1e3, lw=0.8, color="C3")
    ax_r.set_ylabel("minus running mean / mV")
    ax_r.set_xlabel("charge passed in this step / uAh")
    ax_v.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
