"""Complex non-linear least squares (CNLS) fits of equivalent circuits, with guesses made from the data.

Why these choices:
- Modulus weighting (residuals divided by |Z|): a spectrum spans decades of
  |Z|; unweighted, the low-frequency tail owns the fit and the high-frequency
  arc (the interface resistance a battery lab watches) is fitted to noise.
- Parameters are fitted as logarithms: every circuit value is positive and
  spans many decades, so log space keeps steps well scaled and signs right.
  A CPE exponent is fitted as a = exp(-y^2), which keeps it in (0, 1]
  without bounds, so one fast Levenberg-Marquardt solver serves every
  circuit (an exponent that lands on 1 reports no error bar: it sits on
  its bound).
- Initial guesses come from the spectrum itself (the question impedance.py
  users ask most): the high-frequency intercept gives the series resistance,
  each arc of -Z'' gives a resistance (its width on the real axis) and a time
  constant (its apex frequency), the low-frequency tail gives the Warburg
  coefficient. Arcs are assigned to the circuit's parallel groups in the
  order they are written (high frequency first, the usual convention), and a
  few alternative assignments are tried; the fit with the lowest cost wins.
- The Jacobian is analytic: the compiled circuit carries dZ/dp through the
  same tree (forward mode), so an iteration costs one evaluation, and MINPACK's
  lmder is called directly (scipy.optimize.leastsq). bench/eis_fit.py: 10-43x
  faster than impedance.py from the same start (median ~21x).
- Uncertainties are one standard error from the Jacobian at the optimum
  (covariance (J^T J)^-1 s^2 with s^2 the residual variance), as impedance.py
  and curve_fit report them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
from scipy.optimize import leastsq

from labtwin.analysis.eis.circuit import Circuit, Element, Node, Parallel, Series, parse_circuit

UNDETERMINED_RELATIVE_ERROR = 0.5


@dataclass
class CircuitFit:
    circuit: Circuit
    parameters: dict[str, float]
    standard_errors: dict[str, float]
    units: dict[str, str]
    relative_rms: float
    cost: float
    n_evaluations: int
    success: bool
    message: str
    fixed: dict[str, float] = field(default_factory=dict)

    def impedance_ohm(self, frequency_Hz) -> np.ndarray:
        return self.circuit([self.parameters[n] for n in self.circuit.parameter_names], frequency_Hz)

    def undetermined(self) -> list[str]:
        """Parameters the spectrum does not pin down: no finite standard error, or one above half the value
        (a Warburg fitted as 0.30 +- 4 is a number the data do not support). Fixed ones are not counted."""
        out = []
        for name in self.circuit.parameter_names:
            if name in self.fixed:
                continue
            value, error = self.parameters[name], self.standard_errors.get(name)
            if error is None or not math.isfinite(error) or abs(error) > UNDETERMINED_RELATIVE_ERROR * abs(value):
                out.append(name)
        return out

    def table(self) -> str:
        lines = [f"circuit {self.circuit.text}   relative RMS residual {self.relative_rms:.3%}"]
        for name in self.circuit.parameter_names:
            value, err = self.parameters[name], self.standard_errors.get(name, float("nan"))
            tag = " (fixed)" if name in self.fixed else f" +/- {err:.3g}"
            lines.append(f"  {name:10s} {value:12.5g} {self.units[name]:12s}{tag}")
        return "\n".join(lines)


def _as_arrays(frequency_Hz, impedance_ohm) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(frequency_Hz, dtype=float)
    z = np.asarray(impedance_ohm, dtype=complex)
    if f.shape != z.shape or f.ndim != 1:
        raise ValueError(
            f"frequency_Hz and impedance_ohm must be 1-D and the same length (got {f.shape} and {z.shape})"
        )
    good = np.isfinite(f) & np.isfinite(z) & (f > 0)
    if good.sum() < 3:
        raise ValueError("need at least 3 finite points with frequency_Hz > 0 to fit a circuit")
    order = np.argsort(-f[good])
    return f[good][order], z[good][order]


@dataclass
class _Arc:
    frequency_Hz: float
    resistance_ohm: float


def _arcs(frequency_Hz: np.ndarray, z: np.ndarray) -> list[_Arc]:
    """Arcs of -Z'' (high frequency first): apex frequency and width on the real axis."""
    minus_imag = -z.imag
    if len(minus_imag) >= 5:
        smooth = np.convolve(np.pad(minus_imag, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    else:
        smooth = minus_imag
    n = len(smooth)
    peaks = [i for i in range(1, n - 1) if smooth[i] > smooth[i - 1] and smooth[i] >= smooth[i + 1] and smooth[i] > 0]
    arcs = []
    for k, i in enumerate(peaks):
        lo = peaks[k - 1] if k > 0 else 0
        hi = peaks[k + 1] if k + 1 < len(peaks) else n - 1
        left = lo + int(np.argmin(smooth[lo : i + 1]))
        right = i + int(np.argmin(smooth[i : hi + 1]))
        width = z.real[right] - z.real[left]
        if right == n - 1 or width <= 0:  # the arc runs off the low-frequency end
            width = max(width, 2.0 * smooth[i])
        arcs.append(_Arc(float(frequency_Hz[i]), float(max(width, 1e-12))))
    return arcs


def _parallel_groups(node: Node) -> list[Parallel]:
    if isinstance(node, Element):
        return []
    children = node.parts if isinstance(node, Series) else node.branches
    found = [node] if isinstance(node, Parallel) else []
    for child in children:
        found += _parallel_groups(child)
    return found


def _members(node: Node) -> list[Element]:
    if isinstance(node, Element):
        return [node]
    children = node.parts if isinstance(node, Series) else node.branches
    return [e for c in children for e in _members(c)]


def initial_guess(circuit: Circuit, frequency_Hz, impedance_ohm, arc_order: str = "written") -> np.ndarray:
    """Starting values read off the spectrum; ``arc_order`` 'written', 'reversed' or 'spread'."""
    f, z = _as_arrays(frequency_Hz, impedance_ohm)
    omega = 2.0 * np.pi * f
    r_inf = float(max(z.real[0], 1e-3 * np.max(np.abs(z))))
    arcs = _arcs(f, z)
    groups = _parallel_groups(circuit.tree)
    # Only outermost groups carry arcs; nested ones share their parent's.
    nested = {id(g2) for g in groups for g2 in _parallel_groups(g) if g2 is not g}
    outer = [g for g in groups if id(g) not in nested]
    span = float(max(np.max(z.real) - r_inf, 1e-3 * r_inf))
    if arc_order == "spread" or not arcs:
        decades = np.logspace(np.log10(f[0]), np.log10(f[-1]), len(outer) + 2)[1:-1]
        assigned = [_Arc(float(fk), span / max(len(outer), 1)) for fk in decades]
    else:
        chosen = sorted(sorted(arcs, key=lambda a: -a.resistance_ohm)[: len(outer)], key=lambda a: -a.frequency_Hz)
        while len(chosen) < len(outer):  # fewer arcs than groups: put the rest between them, log-spaced
            chosen.append(_Arc(chosen[-1].frequency_Hz / 10.0, chosen[-1].resistance_ohm / 2.0))
        assigned = chosen if arc_order == "written" else chosen[::-1]
    arc_of: dict[str, _Arc] = {}
    for group, group_arc in zip(outer, assigned):
        for element in _members(group):
            arc_of[element.name] = group_arc
    # Warburg coefficient from the low-frequency tail: -Z'' sqrt(omega) at the lowest frequencies.
    tail = max(3, len(f) // 10)
    sigma = float(np.median(np.abs(z.imag[-tail:]) * np.sqrt(omega[-tail:])))
    sigma = max(sigma, 1e-6 * span)
    tau_diffusion = 1.0 / (2.0 * np.pi * f[-1])
    guess: list[float] = []
    series_r_used = False
    for element in circuit.elements:
        arc = arc_of.get(element.name)
        kind = element.kind
        if kind == "R":
            if arc is not None:
                guess.append(arc.resistance_ohm)
            elif not series_r_used:
                guess.append(r_inf)
                series_r_used = True
            else:
                guess.append(0.1 * r_inf)
        elif kind == "C":
            if arc is not None:
                guess.append(1.0 / (2.0 * np.pi * arc.frequency_Hz * arc.resistance_ohm))
            else:  # series capacitor: the low-frequency reactance
                guess.append(1.0 / (omega[-1] * max(-z.imag[-1], 1e-12)))
        elif kind == "CPE":
            alpha = 0.85
            if arc is not None:
                guess += [1.0 / (arc.resistance_ohm * (2.0 * np.pi * arc.frequency_Hz) ** alpha), alpha]
            else:
                guess += [1.0 / (omega[-1] ** alpha * max(np.abs(z[-1]), 1e-12)), alpha]
        elif kind == "L":
            guess.append(max(z.imag[0], 1e-3 * r_inf) / omega[0])
        elif kind == "W":
            guess.append(sigma)
        elif kind in ("Wo", "Ws"):
            guess += [sigma * np.sqrt(2.0 * tau_diffusion), tau_diffusion]
        elif kind == "K":
            a = arc or _Arc(float(np.sqrt(f[0] * f[-1])), span)
            guess += [a.resistance_ohm, 1.0 / (2.0 * np.pi * a.frequency_Hz)]
        else:  # pragma: no cover - every element type has a rule above
            raise ValueError(f"no initial-guess rule for element {element.name}")
    return np.asarray(guess, dtype=float)


def _arc_time_constant_s(group: Parallel, p: np.ndarray, slices: dict[str, slice]) -> float:
    r, c = (slices[e.name] for e in group.branches)  # type: ignore[union-attr]
    kind = group.branches[1].kind  # type: ignore[union-attr]
    if kind == "C":
        return float(p[r][0] * p[c][0])
    q, alpha = p[c]
    return float((p[r][0] * q) ** (1.0 / alpha))


def sort_arcs(circuit: Circuit, params: np.ndarray) -> np.ndarray:
    """Order interchangeable arcs by time constant, fastest first.

    R0-p(R1,C1)-p(R2,C2) fits equally well with the two arcs swapped, so a
    fit's labels are arbitrary until ordered. Arcs of the same shape (p(R,C)
    or p(R,CPE)) in the top-level series are re-labelled so R1 is the
    highest-frequency arc, as circuits are conventionally written; a trend
    of R2 across spectra then follows one physical process.
    """
    if not isinstance(circuit.tree, Series):
        return params
    slices = circuit.slices()
    out = params.copy()
    by_shape: dict[str, list[Parallel]] = {}
    for part in circuit.tree.parts:
        if not (isinstance(part, Parallel) and len(part.branches) == 2):
            continue
        resistor, capacitor = part.branches
        if (
            isinstance(resistor, Element)
            and isinstance(capacitor, Element)
            and resistor.kind == "R"
            and capacitor.kind in ("C", "CPE")
        ):
            by_shape.setdefault(capacitor.kind, []).append(part)
    for groups in by_shape.values():
        if len(groups) < 2:
            continue
        order = sorted(groups, key=lambda g: _arc_time_constant_s(g, params, slices))
        for target, source in zip(groups, order):
            for t_el, s_el in zip(target.branches, source.branches):
                out[slices[t_el.name]] = params[slices[s_el.name]]  # type: ignore[union-attr]
    return out


def _alpha_mask(circuit: Circuit) -> np.ndarray:
    mask = np.zeros(len(circuit.parameter_names), dtype=bool)
    for element, sl in zip(circuit.elements, circuit.slices().values()):
        if element.kind == "CPE":
            mask[sl.start + 1] = True
    return mask


def fit_circuit(
    circuit: str | Circuit,
    frequency_Hz,
    impedance_ohm,
    initial: dict[str, float] | list[float] | None = None,
    fixed: dict[str, float] | None = None,
    weighting: str = "modulus",
) -> CircuitFit:
    """Fit ``circuit`` to a spectrum; guesses are made from the data unless ``initial`` is given."""
    circ = parse_circuit(circuit) if isinstance(circuit, str) else circuit
    f, z = _as_arrays(frequency_Hz, impedance_ohm)
    omega = 2.0 * np.pi * f
    names = circ.parameter_names
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(names)
    if unknown:
        raise ValueError(
            f"fixed parameters {sorted(unknown)} are not in circuit {circ.text}; its parameters are {names}"
        )
    free = np.array([n not in fixed for n in names])
    if weighting == "modulus":
        weight = 1.0 / np.abs(z)
    elif weighting == "unit":
        weight = np.ones_like(f)
    else:
        raise ValueError(f"weighting {weighting!r}: use 'modulus' or 'unit'")
    # Positive values are fitted as logarithms, CPE exponents (0 < a <= 1) as a = exp(-y^2): every
    # parameter is then unbounded, so MINPACK's Levenberg-Marquardt (the fastest here) serves every
    # circuit, and a = 1 (an ideal capacitor, common) is the finite point y = 0 rather than a bound.
    exponent = _alpha_mask(circ)[free]

    def to_values(x: np.ndarray) -> np.ndarray:
        return np.where(exponent, np.exp(-np.square(x)), np.exp(np.clip(x, -300, 300)))  # 1e+-130: no product overflows

    def to_x(values: np.ndarray) -> np.ndarray:
        a = np.clip(values, 1e-9, 1.0)
        return np.where(exponent, np.sqrt(-np.log(a)), np.log(np.clip(values, 1e-300, None)))

    base = np.zeros(len(names))
    for i, n in enumerate(names):
        if n in fixed:
            base[i] = fixed[n]

    def residuals(x: np.ndarray) -> np.ndarray:
        p = base.copy()
        p[free] = to_values(x)
        diff = (circ.impedance(p, omega) - z) * weight
        return np.concatenate([diff.real, diff.imag])

    def jacobian(x: np.ndarray) -> np.ndarray:
        """Analytic: dZ/dp from the compiled tree, times dp/dx of the log / exp(-y^2) transforms."""
        values = to_values(x)
        p = base.copy()
        p[free] = values
        _, dz = circ.impedance_and_gradient(p, omega)
        dp_dx = np.where(exponent, -2.0 * x * values, values)
        dzw = dz[:, free] * (weight * 1.0)[:, None] * dp_dx[None, :]
        return np.vstack([dzw.real, dzw.imag])

    if initial is not None:
        values = [initial[n] for n in names] if isinstance(initial, dict) else list(initial)
        if len(values) != len(names):
            raise ValueError(f"initial has {len(values)} values; circuit {circ.text} has parameters {names}")
        starts = [np.asarray(values, dtype=float)]
    else:
        starts = [initial_guess(circ, f, z, order) for order in ("written", "reversed", "spread")]
    best = None
    for start in starts:
        # MINPACK's lmder directly (scipy.optimize.leastsq): least_squares' wrapper costs more than the fit here.
        x, _, info, message, flag = leastsq(residuals, to_x(start[free]), Dfun=jacobian, full_output=True, maxfev=2000)
        result = SimpleNamespace(
            x=x,
            cost=0.5 * float(np.sum(info["fvec"] ** 2)),
            nfev=int(info["nfev"]),
            success=flag in (1, 2, 3, 4),
            message=message,
            jac=None,
        )
        if best is None or result.cost < best.cost:
            best = result
    assert best is not None
    p = base.copy()
    p[free] = to_values(best.x)
    best.jac = jacobian(best.x)
    if not fixed:
        sorted_p = sort_arcs(circ, p)
        if not np.array_equal(sorted_p, p):  # re-label, then take the Jacobian at the re-labelled optimum
            p = sorted_p
            best.x = to_x(p[free])
            best.jac = jacobian(best.x)
    n_points, n_free = 2 * len(f), int(free.sum())
    dof = max(n_points - n_free, 1)
    s2 = 2.0 * best.cost / dof
    errors = np.full(len(names), np.nan)
    try:
        cov_x = np.linalg.pinv(best.jac.T @ best.jac) * s2
        dvalue_dx = np.where(
            exponent, 2.0 * np.abs(best.x) * p[free], p[free]
        )  # |da/dy|: zero at a = 1 (no error there)
        errors[free] = dvalue_dx * np.sqrt(np.clip(np.diag(cov_x), 0.0, None))
    except np.linalg.LinAlgError:
        pass
    for i, n in enumerate(names):
        if n in fixed:
            errors[i] = 0.0
    rel = (circ.impedance(p, omega) - z) / np.abs(z)
    return CircuitFit(
        circuit=circ,
        parameters=dict(zip(names, p.tolist())),
        standard_errors=dict(zip(names, errors.tolist())),
        units=dict(zip(names, circ.parameter_units)),
        relative_rms=float(np.sqrt(np.mean(np.abs(rel) ** 2))),
        cost=float(best.cost),
        n_evaluations=int(best.nfev),
        success=bool(best.success),
        message=str(best.message),
        fixed=fixed,
    )
