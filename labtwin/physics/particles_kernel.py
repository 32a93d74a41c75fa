"""The many-particle electrode's sample interval compiled with numba: the same algorithm as
``ManyParticleElectrode._trial_reference`` (labtwin.physics.particles), written as loops.

Why: one 0.1C cycle of 200 grain groups is ~7 200 samples and ~15 000 sub-steps; a Newton iteration is a few
hundred exp/log/sqrt on 200-element arrays, which numpy does as ~60 calls whose overhead (~30 us an iteration)
is most of the cost. Loops compiled once do the same arithmetic without it, and a whole sample interval (all
its sub-steps) is one call, so Python pays one dispatch per sample. The numpy version stays the reference: a
test holds the two to the same voltages and the same step counts, and without numba the simulator runs it.

The scalar rules both share (the sub-step length, the BDF2 coefficients, the extrapolation, the error constant,
the step-size controller, Newton's stopping rule) are functions here that the reference calls too.

Packed state (fewer, flat arguments make numba's dispatch cheaper; the electrode keeps its state this way):
``xs`` rows are x now, one sub-step back, two back; ``sv`` is STATE_FIELDS; ``pars`` is PARAMETER_FIELDS;
``counts`` (int64, added to) is COUNT_FIELDS.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np

STATE_FIELDS = ("v", "v_back1", "v_back2", "faradaic_A", "h_back1_s", "h_back2_s", "h_next_s", "newton_theta")
PARAMETER_FIELDS = (
    "equilibrium_V",
    "i0_ref_A",
    "exchange_floor",
    "charge_C",
    "redistribution_per_s",
    "double_layer_F",
    "max_dx",
    "x_edge",
    "tolerance_x",
    "tolerance_V",
    "interface_nucleation",
)
COUNT_FIELDS = ("sub_steps", "newton_iterations", "newton_retries", "error_rejections")
I0_REF, CHARGE = 1, 3  # the parameters that change between samples (ageing, temperature)

NEWTON_ITERATIONS = 6
FAILED, DONE = 0, 1
# Newton stops once the error left after its last update, estimated as theta / (1 - theta) times that update
# (theta: the ratio of successive updates; the last step's for the first iteration), is below NEWTON_KAPPA of
# the tolerance; the first iteration only when its update is within FIRST_UPDATE_MAX tolerances (a far-off
# guess, e.g. a full film's double layer after a current change, must not pass on an old, small theta).
NEWTON_KAPPA = 0.1
FIRST_UPDATE_MAX = 4.0
SAFETY = 0.9
GROWTH_MAX = 2.0  # BDF2 stays zero-stable for step ratios below 1 + sqrt(2)
SHRINK_MIN = 0.2
RETRY_SHRINK = 0.35  # after a Newton failure or a move past max_dx
# The error control gives up below this fraction of the sample: a trial current the electrode cannot take (the
# cell's voltage search tries some: a full film asked for 4C) drives V volts off, against the clipped
# Butler-Volmer exponent, where no step is accurate; such a trial is taken in at most ~1/ERROR_FLOOR sub-steps.
ERROR_FLOOR = 1e-3
# A sample interval that needs more sub-steps than this (accepted, rejected and retried) fails loudly rather
# than computing for minutes (a group switching in and out at its edge once took millions).
MAX_ATTEMPTS = 100_000


def step_length(left_s: float, h_next_s: float) -> float:
    """The next sub-step: the proposal, stretched by up to 10 % or halved so no sliver is left before the sample's end."""
    if left_s <= 1.1 * h_next_s:
        return left_s
    if left_s <= 2.0 * h_next_s:
        return 0.5 * left_s
    return h_next_s


def bdf2(h: float, h1: float) -> tuple[float, float, float]:
    """Variable-step BDF2, (c0 y - c1 y_n + c2 y_{n-1}) / h = f(y): backward Euler from (c1 y_n - c2 y_{n-1}) / c0
    over h / c0. c0 - c1 + c2 = 0, so constant states stay constant."""
    ratio = h / h1
    return (1.0 + 2.0 * ratio) / (1.0 + ratio), 1.0 + ratio, ratio * ratio / (1.0 + ratio)


def extrapolate(y: float, y1: float, y2: float, h: float, h1: float, h2: float) -> float:
    """The quadratic through the last three states, at h ahead: Newton's guess and the error's reference."""
    d1 = (y - y1) / h1
    return y + h * d1 + h * (h + h1) * (d1 - (y1 - y2) / h2) / (h1 + h2)


def error_constant(h: float, h1: float, h2: float) -> float:
    """Local error of BDF2 over (BDF2 solution - extrapolation): -(y'''/6) h^2 (h + h1)^2 / (2h + h1) over
    (y'''/6) h (h + h1) [(h + h1 + h2) - h (h + h1) / (2h + h1)]; 2/7 for equal steps."""
    return h * (h + h1) / ((h + h1 + h2) * (2.0 * h + h1) - h * (h + h1))


def step_factor(err: float, accepted: bool) -> float:
    """The next step over this one, from the error over its tolerance (LTE ~ h^3)."""
    if accepted:
        return GROWTH_MAX if err <= 0.0 else min(GROWTH_MAX, SAFETY * err ** (-1.0 / 3.0))
    return max(SHRINK_MIN, SAFETY * err ** (-1.0 / 3.0))


def newton_converged(iteration: int, norm: float, theta: float) -> bool:
    """Whether the update just made (``norm`` in tolerances) leaves an error below NEWTON_KAPPA of the tolerance."""
    if norm == 0.0:
        return True
    if iteration == 0 and norm > FIRST_UPDATE_MAX:
        return False
    return theta < 1.0 and norm * theta / (1.0 - theta) <= NEWTON_KAPPA


def _linearise(x, v, kt, w, omega, low, eq_v, i0_ref, floor, flat, x_edge, current, u, du, g, a):
    """Per group: current, potential and their derivatives (the reference's ``_linearise``); returns sum I_k, sum w_k U_k."""
    kt_half = 0.5 / kt
    x_full = 1.0 - 2.0 * x_edge  # within one x_edge of the clip: rounding must not switch a group in and out
    x_empty = 2.0 * x_edge
    sum_current = 0.0
    wu_sum = 0.0
    for k in range(x.shape[0]):
        xk = x[k]
        xx = xk * (1.0 - xk)
        root = math.sqrt(xx)
        wi0 = w[k] * i0_ref
        i0 = wi0 * max(2.0 * root, floor)
        di0 = wi0 * (1.0 - 2.0 * xk) / root
        uk = eq_v - omega[k] * (1.0 - 2.0 * xk) - kt * math.log(xk / (1.0 - xk))
        duk = 2.0 * omega[k] - kt / xx
        if flat and xk > low[k] and xk < 1.0 - low[k]:
            uk = eq_v
            duk = 0.0
        e = math.exp(min(max((v - uk) * kt_half, -60.0), 60.0))
        ie = 1.0 / e
        sh2 = e - ie  # 2 sinh
        gk = i0 * kt_half * (e + ie)  # dI_k/dV
        ck = i0 * sh2
        ak = di0 * sh2 - gk * duk  # dI_k/dx_k
        if (xk >= x_full and ck < 0.0) or (xk <= x_empty and ck > 0.0):
            ck = 0.0  # a group at the edge of its range takes no more lithium that way (the reference says why)
            gk = 0.0
            ak = 0.0
        current[k] = ck
        u[k] = uk
        du[k] = duk
        g[k] = gk
        a[k] = ak
        sum_current += ck
        wu_sum += w[k] * uk
    return sum_current, wu_sum


def _solve(rx, rv, m, g, a, du, w, hq, c_dt, dx):
    """The Newton matrix in O(n) (the reference's ``_solve_reference``); fills dx, returns dv (nan if singular)."""
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    p1 = 0.0
    p2 = 0.0
    hh = 0.0
    sum_g = 0.0
    for k in range(m.shape[0]):
        inv = 1.0 / m[k]
        wd = w[k] * du[k]
        a1 += a[k] * rx[k] * inv
        a2 += a[k] * g[k] * inv
        a3 += a[k] * hq[k] * inv
        p1 += wd * rx[k] * inv
        p2 += wd * g[k] * inv
        hh += wd * hq[k] * inv
        sum_g += g[k]
    denom = c_dt - a2 + a3 * p2 / (1.0 + hh) + sum_g
    if not denom > 1e-300:
        return math.nan
    dv = (rv - a1 + a3 * p1 / (1.0 + hh)) / denom
    shared = (p1 - dv * p2) / (1.0 + hh)
    for k in range(m.shape[0]):
        dx[k] = (rx[k] - g[k] * dv - hq[k] * shared) / m[k]
    return dv


def _trial(xs, sv, w, omega, low, pars, dt_s, applied, kt, counts):
    n = xs.shape[1]
    eq_v, i0_ref, floor, q, k_r, c_dl = pars[0], pars[1], pars[2], pars[3], pars[4], pars[5]
    max_dx, x_edge, tol_x, tol_v, flat = pars[6], pars[7], pars[8], pars[9], pars[10] > 0.5
    x = xs[0].copy()
    x1 = xs[1].copy()
    x2 = xs[2].copy()
    v, v1, v2, faradaic, h1, h2, h_next, theta = sv[0], sv[1], sv[2], sv[3], sv[4], sv[5], sv[6], sv[7]
    hq = q * w * (k_r / kt)
    xn = np.empty(n)
    xe = np.empty(n)
    xp = np.empty(n)
    current = np.empty(n)
    u = np.empty(n)
    du = np.empty(n)
    g = np.empty(n)
    a = np.empty(n)
    m = np.empty(n)
    rx = np.empty(n)
    dx = np.empty(n)
    done = 0.0
    h_floor = 1e-9 * max(dt_s, 1.0)
    h_min = ERROR_FLOOR * dt_s
    attempts = 0
    while done < dt_s - 1e-12:
        attempts += 1
        if attempts > MAX_ATTEMPTS:
            return FAILED, xs, sv
        h = step_length(dt_s - done, h_next)
        c0, c1, c2 = bdf2(h, h1)
        he = h / c0
        c_dt = c_dl / he
        ve = (c1 * v - c2 * v1) / c0
        for k in range(n):
            xe[k] = (c1 * x[k] - c2 * x1[k]) / c0
            xp[k] = extrapolate(x[k], x1[k], x2[k], h, h1, h2)
            xn[k] = min(max(xp[k], x_edge), 1.0 - x_edge)
        vp = extrapolate(v, v1, v2, h, h1, h2)
        vn = vp
        theta_step = theta
        ok = False
        dv = 0.0
        max_step = 0.0
        norm_prev = 0.0
        for iteration in range(NEWTON_ITERATIONS):
            counts[1] += 1
            sum_current, wu_sum = _linearise(
                xn, vn, kt, w, omega, low, eq_v, i0_ref, floor, flat, x_edge, current, u, du, g, a
            )
            smallest = 1e300
            for k in range(n):
                qw_he = q * w[k] / he
                m[k] = qw_he + a[k] - hq[k] * du[k]
                rx[k] = qw_he * (xe[k] - xn[k]) - current[k] + hq[k] * (u[k] - wu_sum)
                smallest = min(smallest, m[k] / qw_he)
            if iteration == 0 and smallest <= 0.2:
                break  # a group inside its spinodal grows faster than this step can follow
            dv = _solve(rx, applied - c_dt * (vn - ve) - sum_current, m, g, a, du, w, hq, c_dt, dx)
            if not math.isfinite(dv):
                break  # singular linearisation: retry with a shorter step
            max_step = 0.0
            for k in range(n):
                max_step = max(max_step, abs(dx[k]))
                xn[k] = min(max(xn[k] + dx[k], x_edge), 1.0 - x_edge)
            vn += dv
            norm = max(max_step / tol_x, abs(dv) / tol_v)
            if iteration > 0:
                theta_step = norm / norm_prev if norm_prev > 0.0 else 0.0
            norm_prev = norm
            if newton_converged(iteration, norm, theta_step):
                ok = True
                break
        else:
            ok = abs(dv) <= 1e-3 and max_step <= max_dx  # see the reference: a stalled Newton is retried shorter
        moved = 0.0
        if ok:
            for k in range(n):
                moved = max(moved, abs(xn[k] - x[k]))
        if not ok or moved > max_dx or not math.isfinite(vn):
            counts[2] += 1
            h_next = h * RETRY_SHRINK
            if h_next < h_floor:
                return FAILED, xs, sv
            continue
        # the local error, filtered through (I - he J)^-1 = (Newton matrix)^-1 diag(Q w / he, C / he)
        lte = error_constant(h, h1, h2)
        for k in range(n):
            rx[k] = q * w[k] / he * (xn[k] - xp[k]) * lte
        ev = _solve(rx, c_dt * (vn - vp) * lte, m, g, a, du, w, hq, c_dt, dx)
        err = 1e300
        if math.isfinite(ev):
            err = abs(ev) / tol_v
            for k in range(n):
                err = max(err, abs(dx[k]) / tol_x)
            if not math.isfinite(err):
                err = 1e300
        if err > 1.0 and h > 1.1 * h_min:
            counts[3] += 1
            h_next = max(h * step_factor(err, False), h_min)
            continue
        counts[0] += 1
        faradaic = applied - c_dt * (vn - ve)
        for k in range(n):
            x2[k] = x1[k]
            x1[k] = x[k]
            x[k] = xn[k]
        v2, v1, v = v1, v, vn
        h2, h1 = h1, h
        theta = theta_step
        done += h
        h_next = max(h * step_factor(err, True), min(h_min, GROWTH_MAX * h))
    out = np.empty((3, n))
    out[0] = x
    out[1] = x1
    out[2] = x2
    return DONE, out, np.array([v, v1, v2, faradaic, h1, h2, h_next, theta])


trial: Callable[..., Any] | None = None  # one sample interval, many sub-steps
if importlib.util.find_spec("numba") is not None:  # numba is a dependency; without it the reference runs
    from numba import njit

    # compiled in place: the kernel calls them compiled, the reference calls the same compiled functions
    step_length = njit(cache=True)(step_length)
    bdf2 = njit(cache=True)(bdf2)
    extrapolate = njit(cache=True)(extrapolate)
    error_constant = njit(cache=True)(error_constant)
    step_factor = njit(cache=True)(step_factor)
    newton_converged = njit(cache=True)(newton_converged)
    _linearise = njit(cache=True)(_linearise)
    _solve = njit(cache=True)(_solve)
    trial = njit(cache=True)(_trial)
