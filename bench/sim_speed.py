"""Simulation-core speed: prints each figure issue 3 asks for (run: python bench/sim_speed.py)."""

from __future__ import annotations

import time

import numpy as np

from simulators.cells import load_cell


def ecm_speed() -> float:
    cell = load_cell("lto_bare_thinfilm")
    model = cell.build_model()
    n = 200_000
    t = time.perf_counter()
    for k in range(n):
        model.step(1.0, "current", -0.5 * cell.nominal_capacity_Ah if (k // 3600) % 2 == 0 else 0.5 * cell.nominal_capacity_Ah, 0.0 if (k // 3600) % 2 == 0 else 3.0)
    return n / (time.perf_counter() - t)


def many_particle_cycle_s() -> float:
    cell = load_cell("lto-thin-film")
    model = cell.build_model()
    q = cell.nominal_capacity_Ah
    t = time.perf_counter()
    for current, stop in ((-0.1 * q, 0.1), (0.1 * q, 3.0)):
        for _ in range(100_000):
            v, _ = model.step(10.0, "current", current, stop)
            if (current > 0 and v >= stop - 1e-6) or (current < 0 and v <= stop + 1e-6):
                break
    return time.perf_counter() - t


def eis_s() -> float:
    model = load_cell("lco-lgps-ceramic").build_model()
    f = np.logspace(6, -1, 60)
    t = time.perf_counter()
    for _ in range(20):
        model.impedance_ohm(f)
    return (time.perf_counter() - t) / 20


if __name__ == "__main__":
    rate = ecm_speed()
    print(f"equivalent-circuit cell, 1 s steps: {rate:,.0f} steps/s = {rate:,.0f} x real time (target >= 100 000 x)")
    print(f"many-particle LTO, 200 groups, one 0.1C cycle (10 s samples): {many_particle_cycle_s():.2f} s (target < 1 s)")
    print(f"EIS, 60 frequencies, LCO cell with 12-shell diffusion: {eis_s() * 1e3:.2f} ms (target < 200 ms)")
