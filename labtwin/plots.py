"""PNG plots of a run: voltage against time and voltage against charge, per cell."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_run(samples: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """V-t and V-Q side by side; Q is the net charge since the run started (positive = charged in)."""
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
        ax_q.plot(q_mAh[mask], samples["voltage_V"][mask], lw=0.8, label=f"cycle {cycle}" if cycle else "pre-cycle")
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
