"""EIS fitting speed: labtwin's compiled circuits against impedance.py on the same data and start.

For each measured dummy-circuit spectrum in tests/data/eis (ZPlot files
from impedance.py's own repository) and each circuit, both libraries fit
from the SAME initial guess with the same (modulus) weighting; the script checks they reach the same result
(parameters within 1 %) and prints the time of each and the ratio. labtwin's
automatic guess (no initial values; three starts) is timed too, since that
is what `labtwin analyze eis` does. impedance.py is a bench-only dependency:
pip install impedance.

    python bench/eis_fit.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.analysis.eis import fit_circuit, parse_circuit, read_spectra  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "eis"
CASES = [
    ("R0-p(R1,C1)", None),
    ("L0-R0-p(R1,C1)", None),
    ("R0-p(R1,CPE1)", None),
]
REPEATS = 5


def best_of(fn, repeats: int = REPEATS) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    try:
        from impedance.models.circuits import CustomCircuit
    except ImportError:
        print("impedance.py not installed: pip install impedance (a bench-only dependency)")
        return
    warnings.filterwarnings("ignore")
    rows, ratios = [], []
    for path in sorted(DATA.glob("*.z")):
        spectrum = read_spectra(path)[0]
        f, z = spectrum.frequency_Hz, spectrum.impedance_ohm
        for circuit, _ in CASES:
            parsed = parse_circuit(circuit)
            auto = fit_circuit(parsed, f, z)  # labtwin's own guess, also the common start for both below
            start = [auto.parameters[n] * 1.3 for n in parsed.parameter_names]  # 30 % off: a real fit, not a check
            if "CPE1_1" in parsed.parameter_names:
                start[parsed.parameter_names.index("CPE1_1")] = 0.9
            t_lab, lab = best_of(lambda c=parsed, f=f, z=z, s=start: fit_circuit(c, f, z, initial=s))
            t_imp, imp = best_of(
                lambda c=circuit, f=f, z=z, s=start: CustomCircuit(c, initial_guess=list(s)).fit(
                    f, z, weight_by_modulus=True
                )
            )
            t_auto, _ = best_of(lambda c=parsed, f=f, z=z: fit_circuit(c, f, z))
            same = np.allclose(imp.parameters_, [lab.parameters[n] for n in parsed.parameter_names], rtol=0.01)
            if not same:  # where they differ, say which reached the better optimum (same weighted cost)
                r = (imp.predict(f) - z) / np.abs(z)
                imp_cost = 0.5 * float(np.sum(r.real**2 + r.imag**2))
                same = "labtwin lower cost" if lab.cost < imp_cost * (1 - 1e-6) else "NO"
            ratios.append(t_imp / t_lab)
            rows.append((path.stem, circuit, t_imp * 1e3, t_lab * 1e3, t_imp / t_lab, t_auto * 1e3, same))
    print(
        f"{'spectrum':16s} {'circuit':16s} {'impedance.py':>12s} {'labtwin':>9s} {'ratio':>6s} {'labtwin auto':>12s}  same result"
    )
    for name, circuit, ti, tl, r, ta, same in rows:
        print(
            f"{name:16s} {circuit:16s} {ti:10.1f} ms {tl:7.2f} ms {r:5.1f}x {ta:10.2f} ms  {'yes' if same is True else same}"
        )
    print(
        f"speed-up from the same start: median {np.median(ratios):.1f}x, min {min(ratios):.1f}x (target >= 10x); "
        f"{sum(r[-1] is True for r in rows)} of {len(rows)} fits agree within 1 %, "
        f"{sum(r[-1] == 'labtwin lower cost' for r in rows)} differ where labtwin reached the lower cost, "
        f"{sum(r[-1] == 'NO' for r in rows)} where impedance.py did"
    )


if __name__ == "__main__":
    main()
