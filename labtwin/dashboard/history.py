"""What the run page draws, read from the store: downsampled series, V-Q per cycle, dQ/dV, cycle figures.

The store is the record (the recorder wrote it); the page never asks the broker for history, so a dashboard
on another machine that reaches the store and the broker shows the same figures as `labtwin analyze`.
Every function here is synchronous and runs in a worker thread (``asyncio.to_thread``): a slow or busy store
delays one page, never the live view.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from labtwin.analysis.curves import cycle_charge_Ah, half_cycle_dqdv
from labtwin.analysis.cycles import retention_reference, summarize_cycles
from labtwin.dashboard.downsample import downsample, extremes_indices
from labtwin.data.store import Store


class SampleCache:
    """The columns of the few runs being looked at, read from the store once.

    A run page asks for its series, its cycles and, on every zoom, a span: each would read every sample of
    the run again (1.2 s for a million in SQLite, most of the page's first render). A run's columns are kept
    until the store holds more batches of it (a live run, a gap filled) or it falls out of the few kept.
    """

    def __init__(self, runs: int = 4) -> None:
        self.runs = runs
        self._columns: OrderedDict[str, tuple[tuple[int, int], dict[str, np.ndarray]]] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def samples(self, store: Store, run_id: str) -> dict[str, np.ndarray]:
        with self._guard:
            lock = self._locks.setdefault(run_id, threading.Lock())
        with lock:  # two requests of one page read the run once
            version = store.batch_version(run_id)
            with self._guard:
                cached = self._columns.get(run_id)
                if cached is not None and cached[0] == version:
                    self._columns.move_to_end(run_id)
                    return cached[1]
            columns = store.samples(run_id)
            with self._guard:
                self._columns[run_id] = (version, columns)
                while len(self._columns) > self.runs:
                    old, _ = self._columns.popitem(last=False)
                    self._locks.pop(old, None)
            return columns


SERIES_POINTS = 2000  # pixel columns of a wide screen: more would not be drawn
CURVE_POINTS = 800  # per cycle of a V-Q plot of a few cycles
CURVE_POINTS_IN_ALL = 40_000  # a run of hundreds of cycles: fewer per cycle (the plot is 560 px wide)


def _list(values: np.ndarray, digits: int | None = None) -> list[float | None]:
    """JSON has no NaN: a missing reading is null, drawn as a gap."""
    arr = np.asarray(values, dtype=float)
    if digits is not None:
        arr = np.round(arr, digits)
    if np.isfinite(arr).all():
        return arr.tolist()
    return [None if not math.isfinite(v) else v for v in arr.tolist()]


def run_meta(store: Store, run_id: str) -> dict[str, Any]:
    start, stop = store.run_documents(run_id)
    return {
        "run_id": run_id,
        "lab": start.lab if start else None,
        "channel": start.channel if start else (stop.channel if stop else None),
        "cell_id": start.cell_id if start else None,
        "protocol": start.protocol if start else None,
        "n_steps": start.n_steps if start else None,
        "started": start.time.isoformat() if start else None,
        "stopped": stop.time.isoformat() if stop else None,
        "exit_status": stop.exit_status if stop else None,
        "reason": stop.reason if stop else None,
    }


def series(
    store: Store,
    run_id: str,
    points: int = SERIES_POINTS,
    from_s: float | None = None,
    to_s: float | None = None,
    cache: SampleCache | None = None,
) -> dict[str, Any]:
    """Time, voltage, current (and temperature) of a run, min/max-downsampled over the asked span."""
    s = cache.samples(store, run_id) if cache else store.samples(run_id)
    t = s["time_s"]
    lo = 0 if from_s is None else int(np.searchsorted(t, from_s, "left"))
    hi = len(t) if to_s is None else int(np.searchsorted(t, to_s, "right"))
    window = {k: v[lo:hi] for k, v in s.items()}
    keep = downsample(window, "voltage_V", max(points // 4, 1), also=("current_A",))
    return {
        "run_id": run_id,
        "n_samples": int(len(t)),
        "n_in_span": int(hi - lo),
        "time_s": _list(window["time_s"][keep], 3),
        "voltage_V": _list(window["voltage_V"][keep]),
        "current_A": _list(window["current_A"][keep]),
        "temperature_C": _list(window["temperature_C"][keep], 3),
    }


def cycles(store: Store, run_id: str, cache: SampleCache | None = None) -> dict[str, Any]:
    """Per-cycle figures (labtwin.analysis.cycles), V-Q per cycle and dQ/dV per half cycle
    (labtwin.analysis.curves): the same numbers and curves as `analyze cycling --plot`."""
    events = store.step_events(run_id)
    summaries = summarize_cycles(events)
    reference = retention_reference(summaries)
    first = reference.delivered_Ah if reference else None
    table = [
        {
            "cycle": c.cycle,
            "charge_mAh": c.charge_Ah * 1e3,
            "discharge_mAh": c.discharge_Ah * 1e3,
            "delivered_mAh": c.delivered_Ah * 1e3,
            "coulombic_efficiency": c.coulombic_efficiency,
            # A cycle that did not go both ways (a run stopped mid-cycle) has no CE and no retention to show;
            # retention is against the first complete cycle (labtwin.analysis.cycles.retention_reference).
            "retention": (c.delivered_Ah / first) if first and c.coulombic_efficiency is not None else None,
            "energy_in_mWh": c.energy_in_Wh * 1e3,
            "energy_out_mWh": c.energy_out_Wh * 1e3,
            "first_direction": c.first_direction,
        }
        for c in summaries
    ]
    samples = cache.samples(store, run_id) if cache else store.samples(run_id)
    voltage = np.asarray(samples["voltage_V"])
    curves = []
    per_cycle = cycle_charge_Ah(samples)
    points = max(100, min(CURVE_POINTS, CURVE_POINTS_IN_ALL // max(len(per_cycle), 1)))
    for cycle, (rows, q_Ah) in per_cycle.items():
        keep = extremes_indices(voltage[rows], points // 4)
        curves.append(
            {"cycle": cycle, "charge_mAh": _list(q_Ah[keep] * 1e3), "voltage_V": _list(voltage[rows][keep], 6)}
        )
    dqdv = [
        {
            "cycle": h.cycle,
            "direction": h.direction,
            "voltage_V": _list(h.voltage_V, 6),
            "dq_dv_mAh_per_V": _list(h.dq_dv_Ah_per_V * 1e3),
        }
        for h in half_cycle_dqdv(samples, events, points=200)
    ]
    return {"run_id": run_id, "cycles": table, "curves": curves, "dqdv": dqdv}


def timeline(store: Store, run_id: str) -> dict[str, Any]:
    """What happened when, on the run's cell-time axis: step ends, anomalies, outages, twin prediction."""
    start, _ = store.run_documents(run_id)
    steps = [
        {
            "time_s": e.time_s,
            "step_index": e.step_index,
            "label": e.label,
            "cycle": e.cycle,
            "reason": f"{e.reason.kind}:{e.reason.name}" if e.reason else "",
        }
        for e in store.step_events(run_id)
    ]
    anomalies = [
        {"time_s": a.time_s, "kind": a.kind, "cycle": a.cycle, "message": a.message, "action": a.action}
        for a in store.anomalies(run_id=run_id)
    ]
    outages = [{"from_s": o.from_time_s, "to_s": o.to_time_s, "cause": o.cause} for o in store.outages(run_id)]
    states = store.cell_states(start.cell_id, run_id) if start else []
    twin = [
        {"time_s": c.time_s, "predicted_V": c.predicted_voltage_V, "sigma_V": c.residual_sigma_V}
        for c in states
        if c.predicted_voltage_V is not None
    ]
    return {"run_id": run_id, "steps": steps, "anomalies": anomalies, "outages": outages, "twin": twin}


def warm_imports() -> None:
    """Import what the impedance panel fits with (scipy.optimize, the cell library: 0.7 s) while no page waits:
    the dashboard calls this in a thread at start, so a run page's first render does not pay for it."""
    import labtwin.analysis.eis  # noqa: F401
    import labtwin.physics.library  # noqa: F401


def _circuit_for(store: Store, run_id: str) -> str:
    """The circuit the twin fits for this run's cell (its cell definition's), else the twin's default."""
    from labtwin.physics.library import CellFileError, load_cell
    from labtwin.twin.cell_twin import DEFAULT_CIRCUIT

    start, _ = store.run_documents(run_id)
    states = store.cell_states(start.cell_id, run_id) if start else []
    model = next((c.model for c in states if c.model), "")
    if model:
        try:
            return load_cell(model).eis_circuit
        except (CellFileError, OSError, ValueError):
            pass
    return DEFAULT_CIRCUIT


def impedance(store: Store, run_id: str, circuit: str | None = None) -> dict[str, Any]:
    """The run's impedance spectra, one per EIS step, each with the equivalent circuit fitted to it.

    The circuit is the one the twin fits for the cell (so the trend here is the one its impedance-growth
    detector watched) unless one is asked for. A parameter whose standard error exceeds half its value is
    flagged: the data do not determine it.
    """
    from labtwin.analysis.eis import CircuitError, fit_circuit, parse_circuit

    z = store.impedance(run_id)
    text = circuit or _circuit_for(store, run_id)
    try:
        parsed = parse_circuit(text)
    except CircuitError as exc:
        raise ValueError(f"circuit {text!r}: {exc}") from None
    spectra = []
    for step in np.unique(z["step"]):
        m = z["step"] == step
        f, zr, zi = z["frequency_Hz"][m], z["z_real_ohm"][m], z["z_imag_ohm"][m]
        entry: dict[str, Any] = {
            "step": int(step),
            "cycle": int(z["cycle"][m][0]),
            "time_s": float(z["time_s"][m][-1]),
            "frequency_Hz": _list(f),
            "z_real_ohm": _list(zr),
            "z_imag_ohm": _list(zi),
        }
        try:
            fit = fit_circuit(parsed, f, zr + 1j * zi)
        except ValueError as exc:
            entry["fit"] = {"error": str(exc)}
        else:
            undetermined = set(fit.undetermined())
            good = f[np.isfinite(f) & (f > 0)]
            dense = np.logspace(np.log10(good.min()), np.log10(good.max()), 120) if len(good) else good
            model = fit.impedance_ohm(dense)
            entry["fit"] = {
                "circuit": parsed.text,
                "success": bool(fit.success),
                "relative_rms": float(fit.relative_rms),
                "parameters": {
                    name: {
                        "value": float(fit.parameters[name]),
                        "standard_error": _finite_or_none(fit.standard_errors.get(name)),
                        "unit": fit.units[name],
                        "uncertain": name in undetermined,
                    }
                    for name in parsed.parameter_names
                },
                "frequency_Hz": _list(dense),
                "z_real_ohm": _list(model.real),
                "z_imag_ohm": _list(model.imag),
            }
        spectra.append(entry)
    return {"run_id": run_id, "circuit": parsed.text, "spectra": spectra}


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def run_rows(store: Store, limit: int = 200) -> list[dict[str, Any]]:
    """The newest runs for the index of the run pages."""
    rows = store.runs()[-limit:]
    return [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in vars(r).items()} for r in reversed(rows)]
