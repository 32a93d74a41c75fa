"""The many-particle electrode's error-controlled time stepping (labtwin.physics.particles).

Two claims: the compiled kernel is the numpy reference (the same sub-steps, the same voltages), and the
default tolerances keep a whole 0.1C cycle within a stated RMS voltage error of a converged reference.
tests/test_physics.py holds the seed-000 signatures the stepping must not move.
"""

from __future__ import annotations

import numpy as np
import pytest

import labtwin.physics.particles as particles
from labtwin.physics.cell import PhysicsCell
from labtwin.physics.library import load_cell

needs_numba = pytest.mark.skipif(particles.particles_kernel.trial is None, reason="numba is not installed")

# One 0.1C cycle of the bare film at 10 s samples, against the tolerances / 1000: 0.73 mV measured
# (bench/sim_speed.py prints it); the fixed-step backward Euler this stepping replaced was 1.53 mV.
CYCLE_RMS_BOUND_V = 1.0e-3


def _model(name: str, tolerance_scale: float = 1.0) -> tuple[PhysicsCell, float]:
    cell = load_cell(name)
    p = cell.parameters
    electrode = p.positive.model_copy(
        update={
            "error_tolerance_x": p.positive.error_tolerance_x / tolerance_scale,
            "error_tolerance_V": p.positive.error_tolerance_V / tolerance_scale,
        }
    )
    return PhysicsCell(p.model_copy(update={"positive": electrode}), cell.nominal_capacity_Ah), cell.nominal_capacity_Ah


def _mixed_protocol(model: PhysicsCell, q_Ah: float) -> np.ndarray:
    """Rest, a fast discharge over the plateau at two sample lengths, a voltage hold (the cell's current search
    runs many trials per sample from one committed state), a charge at short samples and a rest."""
    v = [model.step(60.0, "open_circuit")[0] for _ in range(5)]
    v += [model.step(10.0, "current", -0.5 * q_Ah, 0.1)[0] for _ in range(250)]
    v += [model.step(3.3, "current", -0.5 * q_Ah, 0.1)[0] for _ in range(200)]
    v += [model.step(5.0, "voltage", 1.5, 1.0)[0] for _ in range(60)]
    v += [model.step(1.0, "current", 0.5 * q_Ah, 3.0)[0] for _ in range(300)]
    v += [model.step(30.0, "open_circuit")[0] for _ in range(20)]
    return np.array(v)


@needs_numba
@pytest.mark.parametrize("cell", ["lto-thin-film", "lto-thin-film-azo60"])
def test_the_kernel_takes_the_reference_steps_through_holds_reversals_and_changing_samples(cell):
    runs = {}
    for use_kernel in (True, False):
        particles.USE_KERNEL = use_kernel
        try:
            model, q = _model(cell)
            runs[use_kernel] = (_mixed_protocol(model, q), model.positive.counts.copy())
        finally:
            particles.USE_KERNEL = True
    (v_kernel, counts_kernel), (v_reference, counts_reference) = runs[True], runs[False]
    assert np.ptp(v_reference) > 0.05  # the plateau, the hold and the reversal were all there
    assert np.max(np.abs(v_kernel - v_reference)) < 1e-6
    # the same sub-steps and rejections; a Newton stop right at its threshold may tip on summation order
    assert counts_kernel[0] == pytest.approx(counts_reference[0], rel=1e-3)
    assert counts_kernel[3] == pytest.approx(counts_reference[3], rel=1e-2, abs=2)
    assert counts_kernel[1] == pytest.approx(counts_reference[1], rel=1e-3)


def _cycle(model: PhysicsCell, q_Ah: float) -> list[np.ndarray]:
    """The seed-000 0.1C cycle at 10 s samples, as bench/sim_speed.py runs it: voltages per half cycle."""
    halves = []
    for current, stop in ((-0.1 * q_Ah, 0.1), (0.1 * q_Ah, 3.0)):
        voltages = []
        for _ in range(100_000):
            v, _ = model.step(10.0, "current", current, stop)
            voltages.append(v)
            if (current > 0 and v >= stop - 1e-6) or (current < 0 and v <= stop + 1e-6):
                break
        halves.append(np.array(voltages))
    return halves


def _rms_V(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    diffs = [x[: min(len(x), len(y))] - y[: min(len(x), len(y))] for x, y in zip(a, b)]
    return float(np.sqrt(np.mean(np.concatenate(diffs) ** 2)))


@needs_numba
def test_a_cycle_at_the_default_tolerances_is_within_the_stated_error_of_a_converged_reference():
    runs = {}
    for scale in (1.0, 300.0, 1000.0):
        model, q = _model("lto-thin-film", scale)
        runs[scale] = (_cycle(model, q), model.positive.counts.copy())
    converged = runs[1000.0][0]
    assert _rms_V(runs[300.0][0], converged) < 0.1e-3  # the reference has converged (0.03 mV measured)
    assert _rms_V(runs[1.0][0], converged) < CYCLE_RMS_BOUND_V
    assert all(len(h) > 3000 for h in runs[1.0][0])  # the whole plateau each way
    # the error sets the step: ~2 sub-steps per 10 s sample, not the ~6 the fixed largest change of x took
    assert runs[1.0][1][0] < 3 * sum(len(h) for h in runs[1.0][0])
