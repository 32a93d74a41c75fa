"""The many-particle electrode's time step compiled with numba: the same algorithm as
``ManyParticleElectrode._trial_reference`` (labtwin.physics.particles), written as loops.

Why: one 0.1C cycle of 200 grain groups is ~7 200 samples, ~41 000 sub-steps and ~94 000 Newton iterations;
each iteration was ~58 numpy calls on 200-element arrays, so the cost was call overhead (34 us an iteration),
not arithmetic. Loops over the groups compiled once do the same arithmetic without it. The numpy version stays
the reference: a test holds the two to the same voltages, and without numba the simulator runs the reference.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np

NEWTON_ITERATIONS = 6
FAILED, DONE = 0, 1


def _substep(x0, v0, dt, applied, kt, w, omega, eq_v, wi0, floor, q, k_r, c_dl, max_dx, low, use_flat, x_edge):
    n = x0.shape[0]
    x = x0.copy()
    v = v0
    c_dt = c_dl / dt
    has_h = k_r > 0.0
    current = np.empty(n)
    u = np.empty(n)
    du = np.empty(n)
    g = np.empty(n)
    a = np.empty(n)
    m = np.empty(n)
    r = np.empty(n)
    dv = 0.0
    max_step = 0.0
    converged = False
    for iteration in range(NEWTON_ITERATIONS):
        # linearise: currents, potentials and their derivatives per group
        sum_current = 0.0
        sum_g = 0.0
        wu_sum = 0.0
        for k in range(n):
            xk = x[k]
            xx = xk * (1.0 - xk)
            root = math.sqrt(xx)
            i0 = wi0[k] * max(2.0 * root, floor)
            di0 = wi0[k] * (1.0 - 2.0 * xk) / root
            uk = eq_v - omega[k] * (1.0 - 2.0 * xk) - kt * math.log(xk / (1.0 - xk))
            duk = 2.0 * omega[k] - kt / xx
            if use_flat and xk > low[k] and xk < 1.0 - low[k]:
                uk = eq_v
                duk = 0.0
            arg = (v - uk) * (0.5 / kt)
            arg = min(max(arg, -60.0), 60.0)
            e = math.exp(arg)
            ie = 1.0 / e
            sh2 = e - ie
            gk = i0 * (0.5 / kt) * (e + ie)
            ck = i0 * sh2
            current[k] = ck
            u[k] = uk
            du[k] = duk
            g[k] = gk
            a[k] = di0 * sh2 - gk * duk
            sum_current += ck
            sum_g += gk
            wu_sum += w[k] * uk
        smallest = 1e300
        for k in range(n):
            qw_dt = q * w[k] / dt
            if has_h:
                hk = q * w[k] * (k_r / kt)
                m[k] = qw_dt + a[k] - hk * du[k]
                r[k] = qw_dt * (x0[k] - x[k]) - current[k] + hk * (u[k] - wu_sum)
            else:
                m[k] = qw_dt + a[k]
                r[k] = qw_dt * (x0[k] - x[k]) - current[k]
            ratio = m[k] / qw_dt
            if ratio < smallest:
                smallest = ratio
        if iteration == 0 and smallest <= 0.2:
            return FAILED, x, v, 0.0  # a group inside its spinodal grows faster than this step can follow
        f_v = c_dt * (v - v0) + sum_current - applied
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        p1 = 0.0
        p2 = 0.0
        hh = 0.0
        for k in range(n):
            inv = 1.0 / m[k]
            a1 += a[k] * r[k] * inv
            a2 += a[k] * g[k] * inv
            if has_h:
                hk = q * w[k] * (k_r / kt)
                wuk = w[k] * du[k]
                a3 += a[k] * hk * inv
                p1 += wuk * r[k] * inv
                p2 += wuk * g[k] * inv
                hh += wuk * hk * inv
        if has_h:
            denom = c_dt - a2 + a3 * p2 / (1.0 + hh) + sum_g
        else:
            denom = c_dt - a2 + sum_g
        if not denom > 1e-300:
            return FAILED, x, v, 0.0  # singular linearisation: retry with a shorter step
        if has_h:
            dv = (-f_v - a1 + a3 * p1 / (1.0 + hh)) / denom
        else:
            dv = (-f_v - a1) / denom
        max_step = 0.0
        for k in range(n):
            inv = 1.0 / m[k]
            if has_h:
                hk = q * w[k] * (k_r / kt)
                dx = (r[k] - g[k] * dv - hk * ((p1 - dv * p2) / (1.0 + hh))) * inv
            else:
                dx = (r[k] - g[k] * dv) * inv
            if abs(dx) > max_step:
                max_step = abs(dx)
            x[k] = min(max(x[k] + dx, x_edge), 1.0 - x_edge)
        v += dv
        if abs(dv) < 2e-6 and max_step < 1e-5:
            converged = True
            break
    if not converged and (abs(dv) > 1e-3 or max_step > max_dx):
        return FAILED, x, v, 0.0  # see the reference: a stalled Newton is retried shorter, not accepted
    moved = 0.0
    for k in range(n):
        if abs(x[k] - x0[k]) > moved:
            moved = abs(x[k] - x0[k])
    if moved > max_dx or not math.isfinite(v):
        return FAILED, x, v, 0.0
    return DONE, x, v, applied - c_dt * (v - v0)


def _trial(
    x0,
    v0,
    faradaic0,
    dt_s,
    dt_start,
    applied,
    kt,
    w,
    omega,
    eq_v,
    wi0,
    floor,
    q,
    k_r,
    c_dl,
    max_dx,
    low,
    use_flat,
    x_edge,
):
    x = x0.copy()
    v = v0
    faradaic = faradaic0
    done = 0.0
    dt = min(dt_start, dt_s)
    while done < dt_s - 1e-12:
        dt = min(dt, dt_s - done)
        status, xn, vn, fn = _substep(
            x, v, dt, applied, kt, w, omega, eq_v, wi0, floor, q, k_r, c_dl, max_dx, low, use_flat, x_edge
        )
        if status == FAILED:
            dt *= 0.35
            if dt < 1e-9 * max(dt_s, 1.0):
                return FAILED, x, v, faradaic, dt
            continue
        moved = 0.0
        for k in range(x.shape[0]):
            if abs(xn[k] - x[k]) > moved:
                moved = abs(xn[k] - x[k])
        x = xn
        v = vn
        faradaic = fn
        done += dt
        if moved < 0.3 * max_dx:
            dt *= 1.5
    return DONE, x, v, faradaic, dt


trial: Callable[..., Any] | None = None
if importlib.util.find_spec("numba") is not None:  # numba is a dependency; without it the reference runs
    from numba import njit

    _substep = njit(cache=True)(_substep)
    trial = njit(cache=True)(_trial)
