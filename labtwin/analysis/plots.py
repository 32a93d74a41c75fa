"""PNG plots of a run, for the CLI: V-t and V-Q per cell (demo, dryrun), and the cycling figures of
`analyze cycling --plot DIR` (capacity and CE per cycle, V-Q per cycle with a colour bar, dQ/dV, V-t and I-t).

Agg only: these run on headless lab PCs and in CI, never in a window."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colorbar import Colorbar  # noqa: E402
from matplotlib.colors import Colormap, Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from labtwin.analysis.curves import cycle_charge_Ah, half_cycle_dqdv  # noqa: E402
from labtwin.analysis.cycles import CycleSummary, summarize_cycles  # noqa: E402
from labtwin.documents import StepEvent  # noqa: E402


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


# --------------------------------------------------------------------------- cycling figures (issue 15)
#
# The standard plots of a cycling run, for `labtwin analyze cycling --plot DIR`. Each ``*_figure`` builds and
# returns the figure (so a test can read its axes and lines), ``plot_cycling`` writes them all. Cycles,
# capacities and CE are labtwin.analysis.cycles', the curves labtwin.analysis.curves' (which the dashboard
# draws too): nothing here defines a cycle, a capacity or a curve of its own.

CYCLE_COLORMAP = "viridis"
CYCLING_PLOTS = {
    "capacity": "capacity-ce.png",
    "voltage_capacity": "voltage-capacity.png",
    "dqdv": "dqdv.png",
    "time": "voltage-current-time.png",
}


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a figure built here as a PNG and free it (pyplot keeps every open figure alive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cycle_colours(cycles: list[int]) -> tuple[Normalize, Colormap]:
    """One colour per cycle number on a continuous scale, so a 500-cycle run reads as a gradient."""
    lo = min(cycles, default=1)
    hi = max(cycles, default=1)
    return Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1), plt.get_cmap(CYCLE_COLORMAP)


def _cycle_colorbar(fig: Figure, ax: Axes, norm: Normalize, cmap: Colormap) -> Colorbar:
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax)
    bar.set_label("cycle")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    return bar


def _empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def capacity_figure(cycles: list[CycleSummary], title: str) -> Figure:
    """Charge and discharge capacity (mAh) over CE (%), against the cycle number, one panel each."""
    fig, (ax_q, ax_ce) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
    n = [c.cycle for c in cycles]
    ax_q.plot(n, [c.charge_Ah * 1e3 for c in cycles], "o-", ms=4, lw=1, label="charge (into the cell)")
    ax_q.plot(n, [c.discharge_Ah * 1e3 for c in cycles], "s-", ms=4, lw=1, label="discharge (out of the cell)")
    ax_q.set_ylabel("capacity / mAh")
    ax_q.legend(fontsize=8)
    ax_q.grid(alpha=0.3)
    with_ce = [c for c in cycles if c.coulombic_efficiency is not None]
    ax_ce.plot(
        [c.cycle for c in with_ce], [100 * (c.coulombic_efficiency or 0.0) for c in with_ce], "o-", ms=4, color="C2"
    )
    first = cycles[0].first_direction if cycles else None
    ax_ce.set_ylabel("Coulombic efficiency / %")
    ax_ce.set_xlabel("cycle")
    ax_ce.grid(alpha=0.3)
    if not with_ce:
        _empty_note(ax_ce, "no cycle went both ways: no CE")
    if not cycles:
        _empty_note(ax_q, "no cycle: no current flowed")
    ax_ce.xaxis.set_major_locator(MaxNLocator(integer=True))
    convention = "charge / discharge (anode half cell)" if first == "discharge" else "discharge / charge"
    ax_ce.set_title(f"CE = {convention}", fontsize=9)
    fig.suptitle(f"{title}: capacity and Coulombic efficiency per cycle")
    fig.tight_layout()
    return fig


def voltage_capacity_figure(samples: dict[str, np.ndarray], title: str) -> Figure:
    """V against the net charge since each cycle began, one line per cycle coloured by its number."""
    fig, ax = plt.subplots(figsize=(8, 5))
    per_cycle = cycle_charge_Ah(samples)
    norm, cmap = _cycle_colours(list(per_cycle))
    voltage = np.asarray(samples["voltage_V"])
    for cycle, (rows, q_Ah) in per_cycle.items():
        ax.plot(q_Ah * 1e3, voltage[rows], lw=0.9, color=cmap(norm(cycle)), label=f"cycle {cycle}")
    ax.set_xlabel("charge since the cycle began / mAh (+ = into the cell)")
    ax.set_ylabel("voltage / V")
    ax.grid(alpha=0.3)
    if not per_cycle:
        _empty_note(ax, "no cycle: no current flowed")
    _cycle_colorbar(fig, ax, norm, cmap)
    ax.set_title(f"{title}: voltage against charge per cycle")
    fig.tight_layout()
    return fig


def dqdv_figure(samples: dict[str, np.ndarray], events: list[StepEvent], title: str) -> Figure:
    """dQ/dV against V of every half cycle, charge above the axis and discharge below, coloured by cycle
    (labtwin.analysis.curves: the dashboard draws the same curves)."""
    fig, ax = plt.subplots(figsize=(8, 5))
    halves = half_cycle_dqdv(samples, events)
    norm, cmap = _cycle_colours([h.cycle for h in halves])
    for h in halves:
        ax.plot(
            h.voltage_V,
            h.dq_dv_Ah_per_V * 1e3,
            lw=0.9,
            color=cmap(norm(h.cycle)),
            label=f"cycle {h.cycle} {h.direction}",
        )
    ax.axhline(0.0, color="0.6", lw=0.5)
    ax.set_xlabel("voltage / V")
    ax.set_ylabel("dQ/dV / mAh/V (charge +, discharge -)")
    ax.grid(alpha=0.3)
    if not halves:
        _empty_note(ax, "no galvanostatic half cycle of 10 samples or more")
    _cycle_colorbar(fig, ax, norm, cmap)
    ax.set_title(f"{title}: differential capacity per half cycle")
    fig.tight_layout()
    return fig


def time_figure(samples: dict[str, np.ndarray], title: str) -> Figure:
    """Voltage over current against cell time, sharing the time axis."""
    fig, (ax_v, ax_i) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    t_h = np.asarray(samples["time_s"]) / 3600.0
    current = np.asarray(samples.get("current_A", np.zeros(len(t_h))))
    ax_v.plot(t_h, samples["voltage_V"], lw=0.8)
    ax_v.set_ylabel("voltage / V")
    ax_v.grid(alpha=0.3)
    factor, unit = _si_scale(current[np.isfinite(current)], "A")
    ax_i.plot(t_h, current * factor, lw=0.8, color="C1")
    ax_i.axhline(0.0, color="0.6", lw=0.5)
    ax_i.set_ylabel(f"current / {unit} (+ = charge)")
    ax_i.set_xlabel("cell time / h")
    ax_i.grid(alpha=0.3)
    ax_v.set_title(f"{title}: voltage and current against time")
    fig.tight_layout()
    return fig


def plot_cycling(
    samples: dict[str, np.ndarray], events: list[StepEvent], title: str, directory: Path
) -> dict[str, Path]:
    """Every cycling figure of a run as a PNG in ``directory`` (CYCLING_PLOTS names them); returns the paths.

    ``samples``: the store's columns (time_s, voltage_V, current_A, capacity_Ah, step, cycle; step as the
    events' step_index); ``events``: the run's ended step events. ``title``: the cell and the protocol."""
    figures = {
        "capacity": capacity_figure(summarize_cycles(events), title),
        "voltage_capacity": voltage_capacity_figure(samples, title),
        "dqdv": dqdv_figure(samples, events, title),
        "time": time_figure(samples, title),
    }
    return {name: save_figure(fig, directory / CYCLING_PLOTS[name]) for name, fig in figures.items()}
