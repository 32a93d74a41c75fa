"""Equivalent-circuit strings in the impedance.py convention, parsed (never eval'd) and compiled once.

``R0-p(R1,CPE1)-Wo1`` means R0 in series with (R1 parallel to CPE1) in series
with an open Warburg. An element is a type (``R``, ``C``, ``L``, ``CPE``, ``W``,
``Wo``, ``Ws``, ``K``) followed by a label; ``p(a, b, ...)`` is a parallel
group whose branches may themselves be series chains. Parameter names follow
impedance.py (``R0``, ``CPE1_0``, ``CPE1_1``) so users can move between the two.

The string is parsed into a tree once; compiling turns that tree into one
closure that evaluates every frequency at once with a handful of numpy
operations per element. A fit calls it thousands of times, which is where
impedance.py's per-call string evaluation spends its time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

ImpedanceFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ElementType:
    """One kind of circuit element: how many parameters, their units and its impedance."""

    symbol: str
    parameter_units: tuple[str, ...]
    parameter_roles: tuple[str, ...]
    impedance: Callable[..., np.ndarray]
    description: str


def _resistor(omega, r):
    return np.full(omega.shape, r, dtype=complex)


def _capacitor(omega, c):
    return 1.0 / (1j * omega * c)


def _inductor(omega, inductance):
    return 1j * omega * inductance


def _cpe(omega, q, alpha):
    return 1.0 / (q * (1j * omega) ** alpha)


def _warburg(omega, sigma):
    return sigma * (1.0 - 1j) / np.sqrt(omega)


def _warburg_open(omega, z0, tau):
    s = np.sqrt(1j * omega * tau)
    return z0 / (s * np.tanh(s))


def _warburg_short(omega, z0, tau):
    s = np.sqrt(1j * omega * tau)
    return z0 * np.tanh(s) / s


def _rc_tau(omega, r, tau):
    return r / (1.0 + 1j * omega * tau)


# d Z / d parameter for each element, given the element's own Z: what the fit's analytic Jacobian is built from.
def _d_resistor(omega, z, r):
    return [np.ones(omega.shape, dtype=complex)]


def _d_capacitor(omega, z, c):
    return [-z / c]


def _d_inductor(omega, z, inductance):
    return [1j * omega]


def _d_cpe(omega, z, q, alpha):
    return [-z / q, -z * np.log(1j * omega)]


def _d_warburg(omega, z, sigma):
    return [z / sigma]


def _d_warburg_open(omega, z, z0, tau):
    s = np.sqrt(1j * omega * tau)
    coth = 1.0 / np.tanh(s)
    d_ds = (
        z0 * ((1.0 - coth**2) * s - coth) / s**2
    )  # d/ds [coth(s)/s] = (-csch^2(s) s - coth(s)) / s^2, csch^2 = coth^2 - 1
    return [z / z0, d_ds * s / (2.0 * tau)]


def _d_warburg_short(omega, z, z0, tau):
    s = np.sqrt(1j * omega * tau)
    tanh = np.tanh(s)
    d_ds = z0 * ((1.0 - tanh**2) * s - tanh) / s**2
    return [z / z0, d_ds * s / (2.0 * tau)]


def _d_rc_tau(omega, z, r, tau):
    return [z / r, -z * 1j * omega / (1.0 + 1j * omega * tau)]


_GRADIENTS = {
    "R": _d_resistor,
    "C": _d_capacitor,
    "L": _d_inductor,
    "CPE": _d_cpe,
    "W": _d_warburg,
    "Wo": _d_warburg_open,
    "Ws": _d_warburg_short,
    "K": _d_rc_tau,
}


ELEMENTS: dict[str, ElementType] = {
    e.symbol: e
    for e in (
        ElementType("R", ("Ohm",), ("resistance",), _resistor, "resistor"),
        ElementType("C", ("F",), ("capacitance",), _capacitor, "capacitor"),
        ElementType("L", ("H",), ("inductance",), _inductor, "inductor"),
        ElementType("CPE", ("Ohm^-1 s^a", ""), ("cpe_q", "cpe_alpha"), _cpe, "constant phase element 1/(Q (j w)^a)"),
        ElementType("W", ("Ohm s^-0.5",), ("warburg_sigma",), _warburg, "semi-infinite Warburg sigma (1-j)/sqrt(w)"),
        ElementType(
            "Wo",
            ("Ohm", "s"),
            ("warburg_z0", "warburg_tau"),
            _warburg_open,
            "finite-space (open, reflective) Warburg Z0 coth(sqrt(j w tau))/sqrt(j w tau)",
        ),
        ElementType(
            "Ws",
            ("Ohm", "s"),
            ("warburg_z0", "warburg_tau"),
            _warburg_short,
            "finite-length (short, transmissive) Warburg Z0 tanh(sqrt(j w tau))/sqrt(j w tau)",
        ),
        ElementType("K", ("Ohm", "s"), ("resistance", "rc_tau"), _rc_tau, "RC element R/(1 + j w tau), as in Lin-KK"),
    )
}

# Longest symbols first so "CPE1" is not read as "C" + "PE1" and "Wo1" not as "W" + "o1".
_ELEMENT_TOKEN = re.compile(r"(" + "|".join(sorted(ELEMENTS, key=len, reverse=True)) + r")(\w*)")


class CircuitError(ValueError):
    """A circuit string that cannot be read, with the position of the problem."""

    def __init__(self, circuit: str, position: int, message: str):
        pointer = " " * position + "^"
        super().__init__(f"circuit {circuit!r}: {message}\n  {circuit}\n  {pointer}")
        self.position = position


@dataclass(frozen=True)
class Element:
    kind: str
    label: str

    @property
    def name(self) -> str:
        return self.kind + self.label

    @property
    def type(self) -> ElementType:
        return ELEMENTS[self.kind]

    def parameter_names(self) -> list[str]:
        n = len(self.type.parameter_units)
        return [self.name] if n == 1 else [f"{self.name}_{i}" for i in range(n)]


@dataclass(frozen=True)
class Series:
    parts: tuple[Node, ...]


@dataclass(frozen=True)
class Parallel:
    branches: tuple[Node, ...]


Node = Element | Series | Parallel


class _Parser:
    def __init__(self, text: str):
        self.original = text
        self.text = text.replace(" ", "")
        self.pos = 0

    def error(self, message: str) -> CircuitError:
        return CircuitError(self.text, self.pos, message)

    def parse(self) -> Node:
        if not self.text:
            raise self.error(
                "empty circuit; write elements joined by '-' (series) and p(a,b) (parallel), e.g. R0-p(R1,C1)"
            )
        node = self.series()
        if self.pos != len(self.text):
            raise self.error(
                f"unexpected {self.text[self.pos]!r}; elements join with '-' and parallel groups are p(a,b)"
            )
        return node

    def series(self) -> Node:
        parts = [self.term()]
        while self.peek() == "-":
            self.pos += 1
            parts.append(self.term())
        return parts[0] if len(parts) == 1 else Series(tuple(parts))

    def term(self) -> Node:
        if self.text.startswith("p(", self.pos):
            self.pos += 2
            branches = [self.series()]
            while self.peek() == ",":
                self.pos += 1
                branches.append(self.series())
            if self.peek() != ")":
                raise self.error("parallel group not closed; expected ')' or ',' here")
            self.pos += 1
            if len(branches) < 2:
                raise self.error("a parallel group needs at least two branches, e.g. p(R1,C1)")
            return Parallel(tuple(branches))
        match = _ELEMENT_TOKEN.match(self.text, self.pos)
        if not match:
            known = ", ".join(ELEMENTS)
            raise self.error(f"expected an element ({known}) or p(...) here")
        self.pos = match.end()
        return Element(match.group(1), match.group(2))

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""


def _elements_of(node: Node) -> list[Element]:
    if isinstance(node, Element):
        return [node]
    children = node.parts if isinstance(node, Series) else node.branches
    return [e for child in children for e in _elements_of(child)]


@dataclass
class Circuit:
    """A parsed circuit: its elements in string order and one vectorised impedance function.

    ``impedance(params, omega)`` takes the parameters in ``parameter_names``
    order and angular frequencies in rad/s, and returns complex ohms.
    """

    text: str
    tree: Node
    elements: list[Element]
    parameter_names: list[str]
    parameter_units: list[str]
    impedance: ImpedanceFunction = field(repr=False)
    impedance_and_gradient: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    def __call__(self, params, frequency_Hz) -> np.ndarray:
        return self.impedance(np.asarray(params, dtype=float), 2.0 * np.pi * np.asarray(frequency_Hz, dtype=float))

    def slices(self) -> dict[str, slice]:
        """Where each element's parameters sit in the parameter vector."""
        out, start = {}, 0
        for element in self.elements:
            n = len(element.type.parameter_units)
            out[element.name] = slice(start, start + n)
            start += n
        return out


def _compile(node: Node, offsets: dict[str, int]) -> ImpedanceFunction:
    if isinstance(node, Element):
        start, n, fn = offsets[node.name], len(node.type.parameter_units), node.type.impedance
        if n == 1:
            return lambda p, w: fn(w, p[start])
        return lambda p, w: fn(w, *p[start : start + n])
    if isinstance(node, Series):
        parts = [_compile(child, offsets) for child in node.parts]

        def series(p, w):
            total = parts[0](p, w)
            for part in parts[1:]:
                total = total + part(p, w)
            return total

        return series
    branches = [_compile(child, offsets) for child in node.branches]

    def parallel(p, w):
        admittance = 1.0 / branches[0](p, w)
        for branch in branches[1:]:
            admittance = admittance + 1.0 / branch(p, w)
        return 1.0 / admittance

    return parallel


def _compile_gradient(node: Node, offsets: dict[str, int], n_params: int):
    """(Z, dZ/dp) for every frequency: forward-mode derivatives through the same tree, so a fit
    needs one evaluation per iteration instead of one per parameter."""
    if isinstance(node, Element):
        start, n, fn, grad = (
            offsets[node.name],
            len(node.type.parameter_units),
            node.type.impedance,
            _GRADIENTS[node.kind],
        )

        def element(p, w):
            args = p[start : start + n]
            z = fn(w, *args)
            dz = np.zeros((len(w), n_params), dtype=complex)
            for k, column in enumerate(grad(w, z, *args)):
                dz[:, start + k] = column
            return z, dz

        return element
    if isinstance(node, Series):
        parts = [_compile_gradient(child, offsets, n_params) for child in node.parts]

        def series(p, w):
            z, dz = parts[0](p, w)
            for part in parts[1:]:
                zk, dzk = part(p, w)
                z, dz = z + zk, dz + dzk
            return z, dz

        return series
    branches = [_compile_gradient(child, offsets, n_params) for child in node.branches]

    def parallel(p, w):
        admittance, d_admittance = 0.0, 0.0
        for branch in branches:
            zb, dzb = branch(p, w)
            admittance = admittance + 1.0 / zb
            d_admittance = d_admittance - dzb / (zb**2)[:, None]  # dY = -dZ / Z^2
        z = 1.0 / admittance
        return z, -d_admittance * (z**2)[:, None]  # dZ = -dY Z^2

    return parallel


def parse_circuit(text: str) -> Circuit:
    """Read a circuit string and compile its impedance function; raises CircuitError pointing at the problem."""
    parser = _Parser(text)
    tree = parser.parse()
    elements = _elements_of(tree)
    seen: set[str] = set()
    for element in elements:
        if element.name in seen:
            raise CircuitError(
                parser.text,
                parser.text.find(element.name),
                f"element {element.name} appears twice; give each its own label",
            )
        seen.add(element.name)
    offsets, names, units, start = {}, [], [], 0
    for element in elements:
        offsets[element.name] = start
        names += element.parameter_names()
        units += list(element.type.parameter_units)
        start += len(element.type.parameter_units)
    return Circuit(
        parser.text, tree, elements, names, units, _compile(tree, offsets), _compile_gradient(tree, offsets, len(names))
    )
