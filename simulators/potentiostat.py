"""A simulated potentiostat: the Potentiostat protocol on a simulated cell and a shared clock.

It behaves like a source-measure unit: between calls, the cell evolves under
the last setting for exactly the cell time the clock says has passed, and the
instrument's own compliance (voltage limit in current mode, current limit in
voltage mode) takes over the way an SMU's does. Noise comes from a random
generator handed in, so a test can fix it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from labtwin.clock import Clock
from labtwin.potentiostat import Reading
from labtwin.sim.ecm import EcmState, EquivalentCircuitModel
from simulators.cells import CellDefinition

Mode = Literal["off", "open_circuit", "current", "voltage"]


class SimulatedPotentiostat:
    """Implements labtwin.potentiostat.Potentiostat against a simulated cell."""

    def __init__(
        self,
        cell: CellDefinition,
        clock: Clock,
        rng: np.random.Generator | None = None,
        *,
        max_substep_s: float = 5.0,
        initial_soc: float | None = None,
    ) -> None:
        self.cell = cell
        self.model = EquivalentCircuitModel(cell.parameters)
        self.state: EcmState = self.model.initial_state(1, soc=initial_soc)
        self.clock = clock
        self.rng = rng or np.random.default_rng()
        self.max_substep_s = max_substep_s
        self.mode: Mode = "off"
        self._setpoint = 0.0
        self._compliance = math.inf
        self._last_s = clock.now()
        self._current_A = 0.0
        self._voltage_V = float(self.model.terminal_voltage_V(self.state, np.zeros(1))[0])

    # -------------------------------------------------------------- Potentiostat protocol

    def set_current(self, current_A: float, voltage_limit_V: float) -> None:
        self._advance()
        self.mode, self._setpoint, self._compliance = "current", float(current_A), float(voltage_limit_V)

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
        p = self.cell
        v = self._voltage_V + (self.rng.normal(0.0, p.voltage_noise_V) if p.voltage_noise_V else 0.0)
        i = self._current_A + (self.rng.normal(0.0, p.current_noise_A) if p.current_noise_A and self.mode != "off" else 0.0)
        return Reading(voltage_V=float(v), current_A=float(i), temperature_C=p.parameters.temperature_C)

    # -------------------------------------------------------------- physics

    def _advance(self) -> None:
        now = self.clock.now()
        elapsed = now - self._last_s
        self._last_s = now
        if elapsed <= 0:
            return
        n = max(1, math.ceil(elapsed / self.max_substep_s))
        dt = elapsed / n
        for _ in range(n):
            self._substep(dt)

    def _substep(self, dt_s: float) -> None:
        model, state = self.model, self.state
        if self.mode in ("off", "open_circuit"):
            current = 0.0
        elif self.mode == "current":
            current = self._setpoint
            trial = EcmState(state.soc.copy(), state.v_rc_V.copy())
            v = float(model.step_current(trial, current, dt_s)[0])
            # Compliance: the SMU regulates at its voltage limit instead of exceeding it.
            if (current > 0 and v > self._compliance) or (current < 0 and v < self._compliance):
                limited = float(model.current_for_voltage_A(state, self._compliance, dt_s)[0])
                current = min(current, max(limited, 0.0)) if current > 0 else max(current, min(limited, 0.0))
        else:  # voltage
            current = float(model.current_for_voltage_A(state, self._setpoint, dt_s)[0])
            current = max(-self._compliance, min(self._compliance, current))
        self._voltage_V = float(model.step_current(state, current, dt_s)[0])
        self._current_A = current
