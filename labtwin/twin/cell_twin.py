"""One cell's digital twin: the model in the loop, the live estimates, and the detectors.

The twin is fed the same documents the recorder stores (run start, sample
batches, step events) and answers with anomalies and a state. It never
talks to the network itself (service.py does), so replay, tests and the
live service drive the very same object.

Model in the loop: the cell's simulation-core model (the same parameter file
a dry-run uses) is stepped with the MEASURED current over each sample
interval and predicts the voltage; the residual (measured minus predicted)
is what the residual and soft-short detectors watch. State of charge is
counted in coulombs from the last full charge or discharge (a step ended by
its voltage limit), as a battery management system does, with the capacity
re-estimated every cycle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from labtwin.analysis.cycles import charge_direction, summarize_cycle
from labtwin.documents import Action, Anomaly, CellState, RunStart, RunStop, SampleBatch, StepEvent, StepKind
from labtwin.twin.detectors.cycling import CyclingDetector
from labtwin.twin.detectors.impedance import ImpedanceGrowthDetector
from labtwin.twin.detectors.oscillation import OscillationDetector
from labtwin.twin.detectors.residual import ResidualDetector
from labtwin.twin.detectors.soft_short import SoftShortDetector
from labtwin.twin.estimator import RecursiveRcEstimator

log = logging.getLogger(__name__)

DEFAULT_CIRCUIT = "R0-p(R1,CPE1)-W1"


class CellModel(Protocol):
    """What the twin needs of a simulation-core cell (PhysicsCell and EcmCell both are)."""

    nominal_capacity_Ah: float

    def step(
        self, dt_s: float, mode: str, setpoint: float = 0.0, compliance: float = math.inf
    ) -> tuple[float, float]: ...

    def open_circuit_voltage_V(self) -> float: ...


@dataclass
class TwinSettings:
    circuit: str = DEFAULT_CIRCUIT
    policy: dict[str, Action] = field(default_factory=dict)
    compliance_margin_V: float = 0.05


@dataclass
class _Cycle:
    """The cycle the run is in: its number is the one its steps and samples carry (labtwin.analysis.cycles)."""

    number: int = 0
    steps: list[StepEvent] = field(default_factory=list)  # its ended steps, for the figures when it closes


VOLTAGE_CONTROLLED_STEPS = frozenset({StepKind.cv, StepKind.cyclic_voltammetry, StepKind.eis})


def _at_the_knee(
    voltage_V: float, current_A: float, previous_V: float | None, previous_A: float | None, margin_V: float
) -> bool:
    """Whether the interval ended with the cell at a knee of its voltage curve (or held there by its source),
    where the model must not be allowed past the measured voltage: under the same current as the sample
    before (not a step's first interval), the voltage moved by more than ``margin_V`` in the current's
    direction within the interval, or the current fell by more than 1 % (the source met its limit and held
    the voltage: a cc or GITT source regulates its current far closer than that)."""
    if previous_A is None or previous_V is None or current_A * previous_A <= 0:
        return False
    moved_V = (voltage_V - previous_V) * (1.0 if current_A > 0 else -1.0)
    return moved_V > margin_V or abs(current_A) < 0.99 * abs(previous_A)


def _drive_segments(
    dt_s: float, drive_A: float, current_A: float, previous_A: float | None
) -> list[tuple[float, float, bool]]:
    """How the model is driven over one sample interval: (seconds, amperes, ends at the measured sample).

    The instrument's charge counter gives the interval's mean current ``drive_A``. Where the current was
    switched on or off inside the interval (a GITT pulse starts or ends between samples; the grid of samples
    is not the pulse's), the mean is not what the cell carried: a pulse that ended 55 s into a 60 s interval
    drove the cell at its full current for 55 s and left it at rest for 5. Driving the model at the mean for
    all 60 s, clamped at the relaxed voltage measured at the end, lost most of the pulse's charge in the
    model: the bare LCO cell's twin drifted 16 mV of OCV from the cell over a GITT, and its residual crossed
    the alarm (43 mV, 14.5 sigma) on a healthy cell. So a switch is put back where the counted charge says it
    was, with the current the instrument sampled on its side of the switch.
    """
    whole = [(dt_s, drive_A, True)]
    if previous_A is None or (current_A == 0.0) == (previous_A == 0.0) or drive_A == 0.0:
        return whole
    on_A = current_A if current_A != 0.0 else previous_A
    on_s = drive_A * dt_s / on_A
    if not 0.0 < on_s <= dt_s * (1.0 + 1e-6):
        return whole  # the charge does not fit one switch at the sampled current: keep the mean
    on_s = min(on_s, dt_s)
    off_s = dt_s - on_s
    if off_s <= 1e-9 * dt_s:
        return [(dt_s, on_A, True)]
    if current_A == 0.0:  # switched off inside the interval: the current first, then open circuit
        return [(on_s, on_A, False), (off_s, 0.0, True)]
    return [(off_s, 0.0, False), (on_s, on_A, True)]  # switched on: open circuit, then the current


def run_nominal_capacity_Ah(doc: RunStart) -> float | None:
    """The nominal capacity a run's start carries (``metadata['nominal_capacity_Ah']``), if a usable one."""
    text = doc.metadata.get("nominal_capacity_Ah")
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


class CellTwin:
    def __init__(
        self,
        cell: str,
        model_factory: Callable[[], CellModel | None],
        model_name: str = "",
        settings: TwinSettings | None = None,
        lab: str = "",
        nominal_capacity_Ah: float | None = None,
    ) -> None:
        self.cell = cell
        self.lab = lab
        self.model_name = model_name
        self.settings = settings or TwinSettings()
        self._factory = model_factory
        self.model: CellModel | None = model_factory()
        # The cell definition's capacity first: an equivalent-circuit model does not carry one, and a twin that
        # assumed 1 Ah counted a 52 uAh film's state of charge in millionths.
        given = nominal_capacity_Ah or getattr(self.model, "nominal_capacity_Ah", None)
        # Neither given nor in a model (a replay or an import without --model): the run's own, which replay and
        # import infer from the data (RunStart.metadata); 1 Ah only until a run says.
        self._nominal_given = given is not None
        self.nominal_capacity_Ah = given or 1.0
        self.state = CellState(cell=cell, lab=lab, model=model_name)
        self.anomalies: list[Anomaly] = []
        self.run: RunStart | None = None
        self.finished_run_ids: set[str] = set()
        self._new_run_detectors()
        self.impedance_detector = ImpedanceGrowthDetector()
        self.cycling = CyclingDetector(nominal_capacity_Ah=self.nominal_capacity_Ah if self._nominal_given else None)
        self.estimator = RecursiveRcEstimator()

    # ------------------------------------------------------------------ ordering
    def feed(self, doc: RunStart | StepEvent | SampleBatch | RunStop) -> list[Anomaly]:
        """Take any document of the cell's run, in whatever order the bus delivered it.

        MQTT keeps order within a topic, not across data and event topics, so a
        step's first batch can overtake its 'started' event and its 'ended'
        event can overtake its last batch. Documents wait here until what
        precedes them has been applied: batches in seq order and after their
        step started, 'ended' after the batches up to its stats.last_seq.
        """
        if isinstance(doc, RunStart):
            # A resumed run starts again with the seq its record goes on from. The twin that followed it before
            # the crash keeps its model, cycle and detectors (the cell did not change); what waited for the
            # crashed segment's end will never complete and is dropped.
            continuing = self.run is not None and self.run.run_id == doc.run_id
            self._pending: list = []
            self._next_seq = doc.first_seq
            self._open_step: int | None = None
            if continuing:
                self.run = doc
                return []
            self._applied_started: set[int] = set()
            return self.on_run_start(doc)
        if self.run is None or getattr(doc, "run_id", None) != self.run.run_id:
            return []  # a document of a run whose start this twin never saw (joined late): ignored
        self._pending.append(doc)
        found: list[Anomaly] = []
        progressed = True
        while progressed and self._pending:
            progressed = False
            for doc_ in self._pending:
                if self._ready(doc_):
                    self._pending.remove(doc_)
                    found += self._apply(doc_)
                    progressed = True
                    break
        if len(self._pending) > 2000:  # something never arrived (lost batch): apply in arrival order rather than stall
            log.warning(
                "twin %s: %d documents waiting for a predecessor that never came; applying them as they are",
                self.cell,
                len(self._pending),
            )
            for doc_ in sorted(self._pending, key=lambda d: getattr(d, "seq", -1)):
                found += self._apply(doc_)
            self._pending = []
        return found

    def _ready(self, doc) -> bool:
        if isinstance(doc, SampleBatch):
            return doc.seq == self._next_seq and (not doc.step or doc.step[0] in self._applied_started)
        if isinstance(doc, StepEvent):
            if doc.event == "started":
                return self._open_step is None
            last = doc.stats.last_seq if doc.stats else None
            return self._open_step == doc.step_index and (last is None or self._next_seq > last)
        if isinstance(doc, RunStop):
            return self._next_seq > doc.last_seq and self._open_step is None and len(self._pending) == 1
        return True

    def _apply(self, doc) -> list[Anomaly]:
        if isinstance(doc, SampleBatch):
            self._next_seq = max(self._next_seq, doc.seq + 1)
            return self.on_samples(doc)
        if isinstance(doc, StepEvent):
            if doc.event == "started":
                self._applied_started.add(doc.step_index)
                self._open_step = doc.step_index
            else:
                self._open_step = None
            return self.on_step_event(doc)
        if isinstance(doc, RunStop):
            self.finished_run_ids.add(doc.run_id)
            return self.on_run_stop(doc)
        return []

    # ------------------------------------------------------------------ lifecycle
    def _new_run_detectors(self) -> None:
        self.oscillation = OscillationDetector(self.nominal_capacity_Ah)
        self.soft_short = SoftShortDetector(self.nominal_capacity_Ah)
        self.residual = ResidualDetector()
        self._cycle = _Cycle()
        self._first_direction: str | None = None
        self._step_kind: StepKind | None = None
        self._step_index: int | None = None
        self._last_t: float | None = None
        self._last_v: float | None = None
        self._last_q: float | None = None
        self._last_i: float | None = None
        self._rest_t: list[float] = []
        self._rest_r: list[float] = []
        self._rest_v: list[float] = []
        self._step_q: list[float] = []
        self._step_v: list[float] = []
        self._dq_dv_Ah_per_V: float | None = None
        self._spectrum: list[tuple[float, float, float]] = []
        self._soc: float | None = None
        self._step_sign = 0.0  # the direction the running step drives the cell (+ charges), from its first current
        self._capacity_Ah: float | None = None

    def on_run_start(self, doc: RunStart) -> list[Anomaly]:
        self.run = doc
        if self.model is None or self.state.run_id:  # a fresh model per run: the cell's history is in the data
            self.model = self._factory()
        if not self._nominal_given:
            from_run = run_nominal_capacity_Ah(doc)
            if from_run is not None:
                self.nominal_capacity_Ah = from_run
                self.cycling.nominal_capacity_Ah = from_run
                log.info(
                    "twin %s: nominal capacity %.4g Ah from run %s (%s)",
                    self.cell,
                    from_run,
                    doc.run_id,
                    doc.metadata.get("nominal_capacity_source", "given"),
                )
        self._new_run_detectors()
        self.estimator.reset_continuity()
        self.state = self.state.model_copy(
            update={"run_id": doc.run_id, "channel": doc.channel, "time_s": 0.0, "cycle": 0}
        )
        return []

    def on_step_event(self, ev: StepEvent) -> list[Anomaly]:
        found: list[Anomaly] = []
        if ev.event == "started":
            self._step_kind, self._step_index = ev.step, ev.step_index
            self._step_sign = 0.0
            if ev.cycle > self._cycle.number:  # the step opens the next cycle: the one before is complete
                found += self._close_cycle(ev.time_s, ev.cycle)
                self.state = self.state.model_copy(update={"cycle": ev.cycle})
            self.oscillation.start_step()
            self.soft_short.start_step()
            self.residual.start_step()
            if ev.step == StepKind.eis:
                self.estimator.reset_continuity()
            self._rest_t, self._rest_r, self._rest_v, self._step_q, self._step_v = [], [], [], [], []
            self._spectrum = []
            self.state = self.state.model_copy(update={"step": ev.step_index, "cycle": self._cycle.number})
            return found
        if ev.step == StepKind.eis and self._spectrum:
            found += self._fit_spectrum(ev)
        if ev.step == StepKind.rest and self._dq_dv_Ah_per_V:
            leak = self.soft_short.rest_leak(
                np.array(self._rest_t), np.array(self._rest_r), self._dq_dv_Ah_per_V, np.array(self._rest_v)
            )
            if leak is not None:
                found.append(
                    self._anomaly(
                        "soft_short",
                        self._rest_t[len(self._rest_t) // 2],
                        ev.time_s,
                        f"cell loses charge at rest: leakage {leak.leak_A:.3g} A "
                        f"({leak.drift_V * 1e3:.1f} mV below its model over the second half of the rest)",
                        {"leak_A": leak.leak_A, "drift_V": leak.drift_V},
                    )
                )
        if (
            ev.stats is not None
            and ev.step in (StepKind.cc, StepKind.cccv, StepKind.cv, StepKind.cp)
            and len(self._step_q) > 10
        ):
            tail = max(3, len(self._step_q) // 5)
            dq = abs(self._step_q[-1] - self._step_q[-tail])
            dv = abs(self._step_v[-1] - self._step_v[-tail])
            if dv > 1e-4:
                self._dq_dv_Ah_per_V = dq / dv
        if ev.reason is not None and ev.reason.kind == "end_condition" and ev.reason.name == "voltage_V" and ev.stats:
            # A step driven to its end voltage leaves the cell full (charging) or empty: the direction it was
            # driven in says which, even when a full cell took almost no charge before the voltage was there.
            sign = self._step_sign or (ev.stats.charge_Ah - ev.stats.discharge_Ah)
            self._soc = 1.0 if sign > 0 else 0.0
        found += self._count_cycle(ev)
        return found

    def on_run_stop(self, doc: RunStop) -> list[Anomaly]:
        return self._close_cycle(self.state.time_s)

    # ------------------------------------------------------------------ samples
    def on_samples(self, batch: SampleBatch) -> list[Anomaly]:
        found: list[Anomaly] = []
        if batch.frequency_Hz is not None:
            for f, zr, zi in zip(batch.frequency_Hz, batch.z_real_ohm or [], batch.z_imag_ohm or []):
                self._spectrum.append((f, zr, zi))
            self._last_t = batch.time_s[-1]
            return found
        for t, v, i, q in zip(batch.time_s, batch.voltage_V, batch.current_A, batch.capacity_Ah):
            if v is None or i is None:  # the instrument returned no number (the agent tripped on it): no data
                continue
            found += self._sample(t, v, i, q)
        return found

    def _sample(self, t: float, v: float, i: float, q: float) -> list[Anomaly]:
        found: list[Anomaly] = []
        dt = 0.0 if self._last_t is None else t - self._last_t
        self._last_t = t
        # The model is driven with the charge the instrument counted over the interval, not the current
        # sampled at its end: where a step ends inside the interval (a voltage limit met between samples)
        # the two differ, and over cycles the difference would drift the model away from the cell.
        if i != 0.0 and not self._step_sign:
            self._step_sign = 1.0 if i > 0 else -1.0
        dq = None if self._last_q is None else q - self._last_q
        self._last_q = q
        previous_i, self._last_i = self._last_i, i
        drive_A = dq * 3600.0 / dt if dq is not None and dt > 0 else i
        if i != 0.0 and drive_A * i < 0:
            drive_A = i  # a counter reset or a sign mismatch: trust the sampled current
        predicted = None
        if self.model is not None and dt > 0:
            try:
                if self._step_kind == StepKind.rest or (i == 0.0 and abs(drive_A) < 1e-15):
                    predicted, _ = self.model.step(dt, "open_circuit")
                else:
                    # Compliance 50 mV beyond the measured voltage, in the current's direction: where the model
                    # cannot carry the measured current (its cell is a little emptier or fuller than the real
                    # one at the end of a step) it holds that voltage instead of running off to nonsense,
                    # and its state stays near the cell's. A short or a contact fault still shows in full:
                    # it moves the measured voltage against the current's direction, which is not clamped.
                    # The measured voltage bounds only the part of the interval that ends at it (the current it
                    # was measured under); a part before a switch inside the interval is not clamped.
                    margin = self.settings.compliance_margin_V
                    if _at_the_knee(v, i, self._last_v, previous_i, margin):
                        # At the knee that ends a half cycle (the film's 1C charge: 1.65 V to its 2.5 V cut-off
                        # in one 5 s interval) 50 mV beyond the measured voltage is a different state of the
                        # cell, not a tolerance: the bare LTO film's twin, let 50 mV past the cut-off, sat
                        # 30-50 mV off the cell through every rest that followed (lto_formation at 1C: ten
                        # twin_residual alarms on a healthy cell). There the model is held at what was measured.
                        margin = 0.0
                    for span_s, current_A, last in _drive_segments(dt, drive_A, i, previous_i):
                        if current_A == 0.0:
                            predicted, _ = self.model.step(span_s, "open_circuit")
                        else:
                            bound = (v + margin if current_A > 0 else v - margin) if last else math.inf
                            predicted, _ = self.model.step(span_s, "current", current_A, bound)
            except (FloatingPointError, ValueError, ZeroDivisionError) as exc:
                log.warning("twin %s: model step failed (%s); residual paused until the next run", self.cell, exc)
                self.model = None
        residual = v - predicted if predicted is not None else None
        previous_v, self._last_v = self._last_v, v
        if self._soc is not None and dt > 0:
            capacity = self._capacity_Ah or self.nominal_capacity_Ah
            self._soc = min(1.2, max(-0.2, self._soc + i * dt / 3600.0 / capacity))
        if self.model is not None and dt > 0:
            try:
                ocv = self.model.open_circuit_voltage_V()
                self.estimator.add(dt, v - ocv, i)
            except (FloatingPointError, ValueError):
                pass
        if self._step_kind in (StepKind.cc, StepKind.cccv, StepKind.cv, StepKind.cp):
            self._step_q.append(q)
            self._step_v.append(v)
        if self._step_kind == StepKind.cc and i != 0.0:
            onset = self.oscillation.add(t, q, v)
            if onset is not None:
                found.append(
                    self._anomaly(
                        "oscillation_onset",
                        onset.onset_time_s,
                        t,
                        f"voltage oscillation on the plateau: amplitude {onset.amplitude_V * 1e3:.2f} mV, "
                        f"period {onset.period_Ah * 1e6:.3g} uAh",
                        {
                            "amplitude_V": onset.amplitude_V,
                            "period_Ah": onset.period_Ah,
                            "correlation": onset.correlation,
                            "onset_capacity_Ah": onset.onset_capacity_Ah,
                        },
                    )
                )
        if self._step_kind in (StepKind.cc, StepKind.rest):
            jump = self.soft_short.add(t, v, i)
            if jump is not None:
                found.append(
                    self._anomaly(
                        "voltage_drop",
                        t,
                        t,
                        f"sudden voltage change of {jump.jump_V * 1e3:.1f} mV "
                        f"under steady current (typical {jump.typical_change_V * 1e3:.2f} mV per sample)",
                        {"jump_V": jump.jump_V, "typical_change_V": jump.typical_change_V},
                    )
                )
        if self._step_kind == StepKind.rest and residual is not None:
            self._rest_t.append(t)
            self._rest_r.append(residual)
            self._rest_v.append(v)
        # A voltage-controlled step (a CV sweep, a CV hold, a spectrum) imposes the voltage: the model, stepped
        # with the measured current, predicts a voltage the instrument never let the cell take, so its voltage
        # residual says nothing about the cell (seed 001's sweeps on lto-cv raised 10 alarms, up to 582 mV).
        if residual is not None and self._step_kind not in VOLTAGE_CONTROLLED_STEPS:
            excursion = self.residual.add(t, residual, v - previous_v if previous_v is not None else 0.0)
            if excursion is not None:
                found.append(
                    self._anomaly(
                        "twin_residual",
                        excursion.onset_time_s,
                        t,
                        f"measured voltage departs from the twin by {(excursion.residual_V - excursion.baseline_V) * 1e3:.1f} mV "
                        f"({abs(excursion.residual_V - excursion.baseline_V) / excursion.sigma_V:.1f} sigma)",
                        {
                            "residual_V": excursion.residual_V,
                            "baseline_V": excursion.baseline_V,
                            "sigma_V": excursion.sigma_V,
                        },
                    )
                )
        est = self.estimator.estimate()
        remaining = None
        if self._soc is not None and i != 0.0:
            capacity = self._capacity_Ah or self.nominal_capacity_Ah
            left_Ah = (1.0 - self._soc) * capacity if i > 0 else self._soc * capacity
            remaining = t + max(left_Ah, 0.0) * 3600.0 / abs(i)
        self.state = self.state.model_copy(
            update={
                "time_s": t,
                "voltage_V": v,
                "predicted_voltage_V": predicted,
                "residual_V": residual,
                "residual_sigma_V": self.residual.sigma_V,
                "soc": self._soc,
                "series_resistance_ohm": est.series_resistance_ohm if est else None,
                "rc_resistance_ohm": est.rc_resistance_ohm if est else None,
                "rc_time_constant_s": est.rc_time_constant_s if est else None,
                "predicted_step_end_s": remaining,
            }
        )
        return found

    # ------------------------------------------------------------------ impedance
    def _fit_spectrum(self, ev: StepEvent) -> list[Anomaly]:
        from labtwin.analysis.eis import fit_circuit

        data = np.array(self._spectrum, dtype=float)
        self._spectrum = []
        try:
            fit = fit_circuit(self.settings.circuit, data[:, 0], data[:, 1] + 1j * data[:, 2])
        except ValueError as exc:
            log.warning("twin %s: EIS fit failed: %s", self.cell, exc)
            return []
        resistances = {
            name: value
            for name, value in fit.parameters.items()
            if name[0] == "R" and name[1:].isdigit() and name != "R0"
        }
        cycle = max(self._cycle.number, 1)
        self.state = self.state.model_copy(update={"impedance_ohm": dict(fit.parameters)})
        found = []
        for growth in self.impedance_detector.add_fit(cycle, resistances):
            found.append(
                self._anomaly(
                    "impedance_growth",
                    ev.time_s,
                    ev.time_s,
                    f"{growth.element} grew {growth.growth:.0%} over its baseline ({growth.baseline_ohm:.1f} -> "
                    f"{growth.resistance_ohm:.1f} ohm, {growth.rate_ohm_per_cycle:.2f} ohm/cycle)",
                    {
                        "element_resistance_ohm": growth.resistance_ohm,
                        "baseline_ohm": growth.baseline_ohm,
                        "growth": growth.growth,
                        "rate_ohm_per_cycle": growth.rate_ohm_per_cycle,
                    },
                    element=growth.element,
                )
            )
        return found

    # ------------------------------------------------------------------ cycles
    def _count_cycle(self, ev: StepEvent) -> list[Anomaly]:
        """An ended step joins the cycle it carries (the interpreter numbered it when it was sent)."""
        if ev.stats is None:
            return []
        found: list[Anomaly] = []
        if ev.cycle > self._cycle.number:
            found += self._close_cycle(ev.time_s, ev.cycle)
        if self._first_direction is None and ev.cycle > 0:
            self._first_direction = charge_direction(ev)
        self._cycle.steps.append(ev)
        self.state = self.state.model_copy(update={"cycle": self._cycle.number})
        return found

    def _close_cycle(self, time_s: float, next_number: int | None = None) -> list[Anomaly]:
        """The running cycle is complete: its figures, as the run summary reports them, go to the detectors."""
        c = self._cycle
        self._cycle = _Cycle(number=next_number if next_number is not None else c.number + 1)
        if c.number == 0:
            return []
        figures = summarize_cycle(c.number, c.steps, self._first_direction)
        if figures.coulombic_efficiency is None:  # it did not go both ways: not a cycle (a GITT charge, a half)
            return []
        self._capacity_Ah = figures.delivered_Ah
        first = self.cycling.cycles[0].delivered_Ah if self.cycling.cycles else figures.delivered_Ah
        found = [
            self._anomaly(f.kind, time_s, time_s, f.message, f.figures, cycle=figures.cycle)
            for f in self.cycling.add_cycle(figures)
        ]
        self.state = self.state.model_copy(
            update={
                "capacity_Ah": figures.delivered_Ah,
                "capacity_retention": figures.delivered_Ah / first if first else None,
                "coulombic_efficiency": figures.coulombic_efficiency,
            }
        )
        return found

    # ------------------------------------------------------------------ output
    def _anomaly(
        self,
        kind: str,
        onset_s: float,
        detected_s: float,
        message: str,
        figures: dict[str, float],
        cycle: int | None = None,
        element: str | None = None,
    ) -> Anomaly:
        policy = self.settings.policy
        action = policy.get(f"{kind}:{element}") if element else None
        action = action or policy.get(kind, "notify")
        anomaly = Anomaly(
            kind=kind,
            cell=self.cell,
            lab=self.lab,
            channel=self.run.channel if self.run else "",
            run_id=self.run.run_id if self.run else "",
            time_s=onset_s,
            detected_time_s=detected_s,
            cycle=cycle if cycle is not None else self._cycle.number,
            step=self._step_index,
            message=(f"{element}: " if element and not message.startswith(element) else "") + message,
            figures={k: float(v) for k, v in figures.items() if v is not None and math.isfinite(float(v))},
            action=action,
        )
        self.anomalies.append(anomaly)
        self.state = self.state.model_copy(update={"anomalies": len(self.anomalies)})
        return anomaly
