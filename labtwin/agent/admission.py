"""Admission: a step command is checked against the channel's limits before anything reaches the instrument.

The per-sample checks (safety.py) catch a cell that drifts beyond a limit; they cannot catch a command that
asks for the beyond in the first place. Issue 14 measured it: a cv at 10 V and a cc of 50 mA on a channel
limited to 3.8 V / 5 mA were applied, and a step read every 600 s was first checked after 69 % of the cell's
capacity had gone in. The compiler checks a protocol against the channel it compiles for, but the agent
is the last line: a command may come from an old compile, a hand-written script or another lab's flow.

A refused step ends at once with kind "error" and name "refused" (the flow fails the run on it, as on a
trip); the reason names the field, its value and the limit, and says what to change. The step's time
beyond ``step_time_max_s`` is not refused here: the per-sample check clips it.
"""

from __future__ import annotations

from labtwin.documents import EndReason, Limits, StepCommand, StepKind

CURRENT_STEPS = (StepKind.cc, StepKind.cccv, StepKind.gitt)
"""Steps that source ``current_A``: its magnitude must be within current_max_A."""

VOLTAGE_STEPS = (StepKind.cv, StepKind.cccv)
"""Steps that hold ``voltage_V``: it must be within the voltage window."""

TOLERANCE = 1e-9
"""Relative slack for a setpoint equal to its limit (a compiled 0.1 C of a limit that is 0.1 C)."""


def _refuse(field: str, value: float, limit: float, why: str, fix: str) -> EndReason:
    return EndReason(
        kind="error",
        name="refused",
        value=value,
        threshold=limit,
        message=f"refused before anything was applied: {field} {value:g} {why}; {fix}",
    )


def _beyond(value: float, limit: float) -> bool:
    return abs(value) > limit * (1 + TOLERANCE)


def _outside_window(field: str, value: float, limits: Limits, fix: str) -> EndReason | None:
    lo, hi = limits.voltage_min_V, limits.voltage_max_V
    window = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}] V"
    if hi is not None and value > hi + TOLERANCE * max(abs(hi), 1.0):
        return _refuse(field, value, hi, f"V is above voltage_max_V {hi:g} V (window {window})", fix)
    if lo is not None and value < lo - TOLERANCE * max(abs(lo), 1.0):
        return _refuse(field, value, lo, f"V is below voltage_min_V {lo:g} V (window {window})", fix)
    return None


def admit(cmd: StepCommand, limits: Limits) -> EndReason | None:
    """None if ``cmd`` may run within ``limits`` (the channel's, tightened by the step's own), else why not.

    Checked: a held voltage (cv, cccv) and every CV vertex inside [voltage_min_V, voltage_max_V]; a sourced
    current (cc, cccv, gitt, and a cv's current_A if it carries one) within current_max_A; a cp power within
    the most the envelope can deliver, max(|voltage_min_V|, |voltage_max_V|) * current_max_A; the sample
    interval (and a sweep's dwell per potential step, its check interval) at most sample_interval_max_s.
    A limit the channel leaves unset checks nothing of its kind.
    """
    step = cmd.step
    i_max = limits.current_max_A
    if step in VOLTAGE_STEPS and cmd.voltage_V is not None:
        refused = _outside_window(f"{step.value} voltage_V", cmd.voltage_V, limits, "set voltage_V inside the window")
        if refused:
            return refused
    if i_max is not None and cmd.current_A is not None and step in (*CURRENT_STEPS, StepKind.cv):
        if _beyond(cmd.current_A, i_max):
            return _refuse(
                f"{step.value} current_A",
                cmd.current_A,
                i_max,
                f"A is beyond current_max_A {i_max:g} A (a magnitude)",
                "lower the current or the C-rate",
            )
    if step is StepKind.cp and cmd.power_W is not None and i_max is not None:
        volts = [abs(v) for v in (limits.voltage_min_V, limits.voltage_max_V) if v is not None]
        if volts:
            p_max = max(volts) * i_max
            if _beyond(cmd.power_W, p_max):
                return _refuse(
                    "cp power_W",
                    cmd.power_W,
                    p_max,
                    f"W is beyond {p_max:g} W (voltage limit {max(volts):g} V x current_max_A {i_max:g} A)",
                    "lower the power",
                )
    if step is StepKind.cyclic_voltammetry and cmd.sweep is not None:
        sweep = cmd.sweep
        for name in ("start_V", "vertex_1_V", "vertex_2_V"):
            refused = _outside_window(
                f"cyclic_voltammetry {name}", getattr(sweep, name), limits, "keep the sweep inside the window"
            )
            if refused:
                return refused
    bound = limits.sample_interval_bound_s()
    if cmd.sample_interval_s > bound * (1 + TOLERANCE):
        return _refuse(
            "sample_interval_s",
            cmd.sample_interval_s,
            bound,
            f"s is longer than the channel's sample_interval_max_s {bound:g} s (the longest time between safety "
            "checks)",
            "read more often (record less often with record: {interval_s, poll_interval_s}) or raise the channel's "
            "sample_interval_max_s in the lab file",
        )
    if step is StepKind.cyclic_voltammetry and cmd.sweep is not None:
        dwell = cmd.sweep.step_V / cmd.sweep.scan_rate_V_s
        if dwell > bound * (1 + TOLERANCE):
            return _refuse(
                "cyclic_voltammetry step_V / scan_rate_V_s",
                dwell,
                bound,
                f"s per potential step is longer than the channel's sample_interval_max_s {bound:g} s",
                "use a smaller step_V",
            )
    return None
