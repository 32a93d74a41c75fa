"""A simulated potentiostat: the Potentiostat protocol on a simulated cell and a shared clock.

It behaves like a source-measure unit with a frequency response analyser:
between calls the cell evolves under the last setting for exactly the cell
time the clock says has passed, and the instrument's own compliance (voltage
limit in current mode, current limit in voltage mode) takes over the way an
SMU's does: by default its voltage limit in current mode clamps either way (a
discharge limited at its cut-off is held there, as a cycler's CC step is); a
stand-in for an instrument whose limit is a magnitude (``voltage_limit_kind``
"magnitude", a Keithley 2450 or B2900) bounds a discharge only at
``voltage_ceiling_V`` below zero, as that instrument under its driver does, so
a dry-run on it predicts the bench. Impedance is a device-run technique (``RunsTechniques``): the cell
rests at open circuit while each frequency is measured, for ``periods / f``
seconds, and Z comes from the cell model linearised around its state at that
moment, plus measurement noise. Sensor faults from the cell file (noise,
dropouts) are applied to the readings here; physical faults live in the cell.
Noise comes from a random generator handed in, so a test can fix it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Literal

import numpy as np

from labtwin.devices.clock import Clock
from labtwin.devices.potentiostat import Reading, VoltageLimitKind
from labtwin.documents import StepCommand, StepKind
from labtwin.physics.library import CellDefinition

Mode = Literal["off", "open_circuit", "current", "voltage"]


class SimulatedPotentiostat:
    """Implements labtwin.devices.potentiostat.Potentiostat and RunsTechniques against a simulated cell."""

    def __init__(
        self,
        cell: CellDefinition,
        clock: Clock,
        rng: np.random.Generator | None = None,
        *,
        max_substep_s: float = 10.0,
        initial_soc: float | None = None,
        voltage_limit_kind: VoltageLimitKind = "clamp",
        voltage_ceiling_V: float = 5.0,
        min_read_interval_s: float | None = None,
    ) -> None:
        self.cell = cell
        self.model = cell.build_model()
        if initial_soc is not None and hasattr(self.model, "soc"):
            self.model.soc = initial_soc
            self.model.voltage_V = self.model.open_circuit_voltage_V()
        self.clock = clock
        self.rng = rng or np.random.default_rng()
        self.max_substep_s = max_substep_s
        self.voltage_limit_kind: VoltageLimitKind = voltage_limit_kind
        self.voltage_ceiling_V = abs(voltage_ceiling_V)
        # The shortest time between two readings (check_interval.py): the instrument's it stands for.
        self.min_read_interval_s = min_read_interval_s if min_read_interval_s is not None else 0.05
        self.mode: Mode = "off"
        self._setpoint = 0.0
        self._compliance = math.inf
        self._last_s = clock.now()
        self._last_reading: Reading | None = None
        self._abort = threading.Event()

    # -------------------------------------------------------------- Potentiostat protocol

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        self._advance()
        limit = float(voltage_limit_V)
        if self.voltage_limit_kind == "magnitude":
            # |V| is what the instrument limits: charging up to the limit; discharging its driver has to set the
            # ceiling (a lower cut-off cannot be a magnitude), and the cell may go down to minus that.
            limit = abs(limit) if current_A > 0 else -self.voltage_ceiling_V
        self.mode, self._setpoint, self._compliance = "current", float(current_A), limit

    def set_voltage(self, voltage_V: float, current_limit_A: float) -> None:
        self._advance()
        self.mode, self._setpoint, self._compliance = "voltage", float(voltage_V), abs(float(current_limit_A))

    def open_circuit(self) -> None:
        self._advance()
        self.mode, self._setpoint = "open_circuit", 0.0

    def output_off(self) -> None:
        self._advance()
        self.mode, self._setpoint = "off", 0.0

    def read(self) -> Reading:
        self._advance()
        return self._measure()

    def _measure(self, **extra) -> Reading:
        model, cell = self.model, self.cell
        age = getattr(model, "age_s", 0.0)
        faults = [f for f in getattr(model, "faults", []) if f.at_time_s <= age]
        if self._last_reading is not None and any(
            f.kind == "dropout" and self.rng.random() < f.probability for f in faults
        ):
            return self._last_reading  # a frozen sensor: the same value again
        noise_V = math.hypot(cell.voltage_noise_V, *[f.noise_V for f in faults if f.kind == "sensor_noise"])
        v = model.voltage_V + (self.rng.normal(0.0, noise_V) if noise_V else 0.0)
        i = model.current_A
        if cell.current_noise_A and self.mode not in ("off", "open_circuit"):
            i += self.rng.normal(0.0, cell.current_noise_A)
        reading = Reading(voltage_V=float(v), current_A=float(i), temperature_C=float(model.temperature_C), **extra)
        self._last_reading = reading
        return reading

    # -------------------------------------------------------------- RunsTechniques protocol

    def supports(self, step: StepKind) -> bool:
        return step is StepKind.eis

    def run_technique(self, command: StepCommand) -> Iterator[Reading]:
        if command.step is not StepKind.eis or command.eis is None:
            raise ValueError(f"the simulated potentiostat runs only eis as a device technique, not {command.step}")
        self._abort.clear()
        self.open_circuit()
        settings = command.eis
        elapsed = 0.0
        for f in settings.frequencies_Hz():
            if self._abort.is_set():
                return
            duration = max(settings.periods / f, 0.1)
            self.clock.sleep(duration)
            self._advance()
            elapsed += duration
            z = complex(self.model.impedance_ohm(np.array([f]))[0])
            sigma = self.cell.impedance_noise_relative * abs(z)
            if sigma:
                z += complex(self.rng.normal(0, sigma), self.rng.normal(0, sigma))
            yield self._measure(time_s=elapsed, frequency_Hz=float(f), z_real_ohm=z.real, z_imag_ohm=z.imag)

    def abort(self) -> None:
        self._abort.set()
        self.output_off()

    # -------------------------------------------------------------- physics

    def _advance(self) -> None:
        now = self.clock.now()
        elapsed = now - self._last_s
        self._last_s = now
        if elapsed <= 0:
            return
        n = max(1, math.ceil(elapsed / self.max_substep_s - 1e-9))
        dt = elapsed / n
        mode = "open_circuit" if self.mode == "off" else self.mode
        for _ in range(n):
            self.model.step(dt, mode, self._setpoint, self._compliance)
