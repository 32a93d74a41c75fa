"""Simulation-core speed: prints each figure issue 3 asks for (run: python bench/sim_speed.py)."""

from __future__ import annotations

import time

import numpy as np

from labtwin.physics.library import load_cell


def ecm_speed() -> float:
    cell = load_cell("lto_bare_thinfilm")
    model = cell.build_model()
    n = 200_000
    t = time.perf_counter()
    for k in range(n):
        model.step(
            1.0,
            "current",
            -0.5 * cell.nominal_capacity_Ah if (k // 3600) % 2 == 0 else 0.5 * cell.nominal_capacity_Ah,
            0.0 if (k // 3600) % 2 == 0 else 3.0,
        )
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


def spm_side_by_side(dt_s: float = 10.0) -> dict[str, float]:
    """PyBaMM's SPM (Marquis2019) and labtwin's nearest model on the same 1C discharge.

    labtwin's nearest model to the SPM is a PhysicsCell with two insertion
    electrodes (single spherical particle per electrode, finite-volume
    diffusion, symmetric Butler-Volmer with i0 ~ sqrt(x(1-x)), no electrolyte).
    Every number is read from PyBaMM's parameter set, so differences come from
    the numerics (our backward-Euler finite volumes on 12 graded shells and
    tabulated OCPs vs PyBaMM's method of lines and its IDA solver).
    """
    import pybamm

    from labtwin.physics.cell import CellParameters, PhysicsCell

    pv = pybamm.ParameterValues("Marquis2019")
    T_K = pv["Ambient temperature [K]"]
    area_m2 = pv["Electrode height [m]"] * pv["Electrode width [m]"]
    c_e = pv["Initial concentration in electrolyte [mol.m-3]"]
    faraday = 96485.33212

    def value(expr):
        return float(np.ravel(pv.evaluate(expr))[0]) if isinstance(expr, pybamm.Symbol) else float(expr)

    def electrode(side: str) -> dict:
        c_max = pv[f"Maximum concentration in {side.lower()} electrode [mol.m-3]"]
        radius = pv[f"{side} particle radius [m]"]
        eps = pv[f"{side} electrode active material volume fraction"]
        thickness = pv[f"{side} electrode thickness [m]"]
        surface_m2 = 3.0 * eps / radius * thickness * area_m2
        j0 = pv[f"{side} electrode exchange-current density [A.m-2]"]
        j0_half = value(j0(pybamm.Scalar(c_e), pybamm.Scalar(0.5 * c_max), pybamm.Scalar(c_max), pybamm.Scalar(T_K)))
        diffusivity = pv[f"{side} particle diffusivity [m2.s-1]"]
        d = value(diffusivity(pybamm.Scalar(0.5), pybamm.Scalar(T_K))) if callable(diffusivity) else float(diffusivity)
        x = np.linspace(0.002, 0.998, 499)
        ocp = np.ravel(pv.evaluate(pv[f"{side} electrode OCP [V]"](pybamm.Array(x))))
        return {
            "kind": "insertion",
            "ocp": {"kind": "tabulated", "x": x.tolist(), "voltage_V": ocp.tolist()},
            "capacity_Ah": c_max * eps * thickness * area_m2 * faraday / 3600.0,
            "initial_x": pv[f"Initial concentration in {side.lower()} electrode [mol.m-3]"] / c_max,
            "exchange_current_A": j0_half * surface_m2,
            "diffusion": {
                "geometry": "spherical",
                "length_m": radius,
                "diffusivity_m2_s": d,
                "n_volumes": 12,
                "surface_refinement": 0.85,
            },
        }

    capacity_Ah = pv["Nominal cell capacity [A.h]"]
    cut_off_V = pv["Lower voltage cut-off [V]"]
    duration_s = 3600.0
    t_eval = np.arange(0.0, duration_s + dt_s, dt_s)

    t0 = time.perf_counter()
    model = pybamm.lithium_ion.SPM()
    sim = pybamm.Simulation(model, parameter_values=pv)
    solution = sim.solve(t_eval)  # 1C is the parameter set's default current
    pybamm_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sim.solve(t_eval)  # built and discretised: the solve alone
    pybamm_solve_s = time.perf_counter() - t1
    t_py = solution["Time [s]"].entries
    v_py = solution["Voltage [V]"].entries

    params = CellParameters(
        series_resistance_ohm=0.0,
        temperature_C=T_K - 273.15,
        positive=electrode("Positive"),
        negative=electrode("Negative"),
    )
    t2 = time.perf_counter()
    cell = PhysicsCell(params, capacity_Ah)
    v_ours = []
    for _ in t_eval[1:]:
        v, _ = cell.step(dt_s, "current", -capacity_Ah, cut_off_V)
        v_ours.append(v)
        if v <= cut_off_V + 1e-6:
            break
    ours_s = time.perf_counter() - t2
    t_ours = t_eval[1 : len(v_ours) + 1]
    common = t_ours[t_ours <= t_py[-1]]
    v_py_common = np.interp(common, t_py, v_py)
    rms = float(np.sqrt(np.mean((np.asarray(v_ours[: len(common)]) - v_py_common) ** 2)))
    return {
        "pybamm_total_s": pybamm_s,
        "pybamm_solve_s": pybamm_solve_s,
        "labtwin_s": ours_s,
        "rms_V": rms,
        "pybamm_end_s": float(t_py[-1]),
        "labtwin_end_s": float(t_ours[-1]),
        "points": len(common),
    }


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
    import labtwin.physics.particles as particles

    many_particle_cycle_s()  # numba compiles (or loads its cache) on the first step
    compiled = many_particle_cycle_s()
    particles.USE_KERNEL = False
    reference = many_particle_cycle_s()
    particles.USE_KERNEL = True
    print(
        f"many-particle LTO, 200 groups, one 0.1C cycle (10 s samples): compiled {compiled:.2f} s beside the numpy "
        f"reference {reference:.2f} s ({reference / compiled:.1f}x; target < 0.3 s)"
    )
    print(f"EIS, 60 frequencies, LCO cell with 12-shell diffusion: {eis_s() * 1e3:.2f} ms (target < 200 ms)")
    try:
        spm = spm_side_by_side()
    except ImportError:
        print("PyBaMM comparison skipped: pip install pybamm (a bench-only dependency)")
    else:
        print(
            f"1C discharge, Marquis2019 parameters, 10 s output: PyBaMM SPM {spm['pybamm_total_s']:.2f} s "
            f"(solve alone {spm['pybamm_solve_s']:.3f} s), labtwin {spm['labtwin_s']:.3f} s; "
            f"RMS voltage difference {spm['rms_V'] * 1e3:.1f} mV over {spm['points']} points; "
            f"cut-off at {spm['pybamm_end_s']:.0f} s (PyBaMM) vs {spm['labtwin_end_s']:.0f} s (labtwin)"
        )
