"""Protocol -> the flat list of StepCommands an agent runs, checked before anything moves.

Compiling resolves C-rates against the cell's nominal capacity, expands
cycle loops, gives every step a time bound (the flow's timeout and the
agent's step-time limit derive from it), and refuses a protocol that asks
for more than the channel allows (the tighter of channel and protocol limits
is what the agent enforces; asking for more is an error, not a clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import ValidationError

from labtwin.documents import (
    EisSettings,
    EndConditions,
    GittSettings,
    Limits,
    RecordRule,
    StepCommand,
    StepKind,
    SweepSettings,
)
from labtwin.protocols.model import (
    CC,
    CCCV,
    CP,
    CV,
    EIS,
    GITT,
    CycleCondition,
    Goto,
    Group,
    Loop,
    Protocol,
    ProtocolError,
    Repeat,
    Rest,
    Voltammetry,
    compiled_steps,
    in_file,
    sweep_points,
)

# A cc step ending on voltage alone may take at most this multiple of the
# time its charge would take at nominal capacity (then the step-time limit trips).
CC_TIME_MARGIN = 1.5
CV_DEFAULT_MAX_S = 10 * 3600.0
HOST_TIMED = (StepKind.rest, StepKind.cc, StepKind.cp, StepKind.cv, StepKind.cccv)


@dataclass(frozen=True)
class CompileContext:
    run_id: str
    nominal_capacity_Ah: float | None = None
    channel_limits: Limits | None = None


def _current_A(c_rate: float | None, current_A: float | None, ctx: CompileContext, where: str) -> float:
    if current_A is not None:
        return current_A
    if ctx.nominal_capacity_Ah is None:
        raise ProtocolError(
            f"{where}: c_rate needs the cell's nominal capacity (metadata.nominal_capacity_Ah or the channel's cell)"
        )
    if c_rate is None:
        raise ProtocolError(f"{where}: give c_rate or current_A")
    return c_rate * ctx.nominal_capacity_Ah


@dataclass
class StepInstr:
    """A step of the program: its command (step_index = position in the program) and what follows each end."""

    command: StepCommand
    then: dict[str, object]  # condition name -> "next" | "stop" | "pause" | Goto
    loops: tuple[int, ...] = ()  # the loops it is inside, outermost first


@dataclass
class LoopStart:
    loop: int
    loops: tuple[int, ...] = ()


@dataclass
class LoopEnd:
    loop: int
    start: int  # program position of the LoopStart
    until: CycleCondition
    max_cycles: int
    loops: tuple[int, ...] = ()


@dataclass
class Program:
    """A protocol compiled for one run: the steps and loop markers in order, and where each tag points."""

    instructions: list
    tags: dict[str, int]
    stop_when: CycleCondition | None

    @property
    def steps(self) -> list[StepCommand]:
        return [i.command for i in self.instructions if isinstance(i, StepInstr)]

    @property
    def is_static(self) -> bool:
        """No loop-until, goto, stop or pause: the steps run once each, in order (their indices are final)."""
        return self.stop_when is None and all(
            isinstance(i, StepInstr) and all(a == "next" for a in i.then.values()) for i in self.instructions
        )


def compile_protocol(protocol: Protocol, ctx: CompileContext) -> list[StepCommand]:
    """The steps in program order, each a StepCommand ready to publish (loops listed once)."""
    return compile_program(protocol, ctx).steps


def compile_program(protocol: Protocol, ctx: CompileContext) -> Program:
    """The program a run executes (labtwin.protocols.program.Interpreter): steps, loops, tags, stops.

    Every refusal is a ProtocolError naming the field (and, for a protocol read from a file, the file and line);
    the size of what is compiled is checked from the parameters first (compiled_steps), so a refusal is quick."""
    try:
        compiled_steps(protocol.method)
        return _compile(protocol, ctx)
    except ProtocolError as exc:
        raise ProtocolError(in_file(protocol, str(exc))) from None


def _compile(protocol: Protocol, ctx: CompileContext) -> Program:
    if ctx.nominal_capacity_Ah is None and protocol.metadata.nominal_capacity_Ah is not None:
        ctx = CompileContext(ctx.run_id, protocol.metadata.nominal_capacity_Ah, ctx.channel_limits)
    limits = protocol.safety
    if ctx.channel_limits is not None:
        refused = ctx.channel_limits.violations_of(limits)
        if refused:
            raise ProtocolError("the protocol asks for more than the channel allows: " + "; ".join(refused))
        limits = ctx.channel_limits.tighten(limits)
    instructions: list = []
    tags: dict[str, int] = {}
    in_repeat = [0]

    def add_tag(tag: str | None, where: str) -> None:
        if tag is None:
            return
        if in_repeat[0]:
            raise ProtocolError(
                f"{where}: tag {tag!r} is inside a repeat, whose steps are copied once per repetition, so a "
                "goto could not tell which copy it means: use a loop (or move the tag out)"
            )
        if tag in tags:
            raise ProtocolError(f"{where}: tag {tag!r} is used twice; tags name one place in the protocol")
        tags[tag] = len(instructions)

    step_count = [0]

    record = protocol.record
    changes = record.voltage_change_V is not None or record.current_change_A is not None

    def emit_step(cmd: StepCommand, step, loops: tuple[int, ...], where: str) -> None:
        step_count[0] += 1
        if (changes or record.poll_interval_s is not None) and cmd.step in HOST_TIMED:
            # Read every poll interval (every reading checked), record by the rule.
            cmd = cmd.model_copy(
                update={
                    "sample_interval_s": min(record.poll_s(), cmd.sample_interval_s),
                    "record": RecordRule(
                        interval_s=cmd.sample_interval_s,
                        voltage_change_V=record.voltage_change_V,
                        current_change_A=record.current_change_A,
                    ),
                }
            )
        bound = limits.sample_interval_bound_s()
        if cmd.sample_interval_s > bound and cmd.step in (*HOST_TIMED, StepKind.gitt):
            # Read (and check) at least as often as the channel allows, record at the protocol's interval.
            rule = cmd.record or RecordRule(interval_s=cmd.sample_interval_s)
            cmd = cmd.model_copy(update={"sample_interval_s": bound, "record": rule})
        then = {("current_A" if k == "c_rate" else k): v for k, v in (step.then if step is not None else {}).items()}
        instructions.append(StepInstr(cmd, then, loops))

    def emit(item, repetition: int, where: str, loops: tuple[int, ...]) -> None:
        try:
            emit_item(item, repetition, where, loops)
        except ValidationError as exc:  # a document's own bound (labtwin.documents), met by what the step asks for
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            got = first.get("input")
            raise ProtocolError(
                f"{where}: compiles to a {exc.title} whose {field or 'value'} is refused: "
                f"{first['msg'].removeprefix('Value error, ')}"
                + (f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else "")
            ) from None
        except ProtocolError as exc:
            if str(exc).startswith(where):
                raise
            raise ProtocolError(f"{where}: {exc}") from None
        except (ZeroDivisionError, OverflowError):
            raise ProtocolError(f"{where}: its numbers are too small or too large to compute a time bound") from None

    def emit_item(item, repetition: int, where: str, loops: tuple[int, ...]) -> None:
        index = step_count[0]
        step_model = next(iter(item.__dict__.values()))
        add_tag(getattr(step_model, "tag", None), where)
        interval = protocol.record.interval_s
        if isinstance(item, Rest):
            rest_step = item.rest
            dvdt = rest_step.until.dvdt_V_per_h if rest_step.until is not None else None
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                repetition=repetition,
                step=StepKind.rest,
                label=rest_step.label
                or f"rest {rest_step.duration_s:g} s" + (f" or until |dV/dt| < {dvdt * 1e3:g} mV/h" if dvdt else ""),
                end=EndConditions(time_s=rest_step.duration_s, dvdt_V_per_h=dvdt),
                limits=_step_limits(limits, None),
                sample_interval_s=min(interval, rest_step.duration_s),
            )
        elif isinstance(item, CC):
            cc_step = item.cc
            current = _current_A(cc_step.c_rate, cc_step.current_A, ctx, f"{where}.cc")
            if limits.current_max_A is not None and abs(current) > limits.current_max_A:
                raise ProtocolError(
                    f"{where}.cc: current {current:.6g} A exceeds current_max_A {limits.current_max_A:g} A; "
                    "lower the current or raise the limit (the channel's own limit cannot be exceeded)"
                )
            _check_voltage(cc_step.until.voltage_V, limits, f"{where}.cc.until.voltage_V")
            bound = cc_step.until.time_s
            if bound is None:
                charge = cc_step.until.capacity_Ah or ctx.nominal_capacity_Ah
                if charge is None:
                    raise ProtocolError(f"{where}.cc: without until.time_s the step needs a capacity to bound its time")
                bound = CC_TIME_MARGIN * charge / abs(current) * 3600.0
            label = cc_step.label or (
                f"{'charge' if current > 0 else 'discharge'} {current:.3g} A"
                + (f" to {cc_step.until.voltage_V:g} V" if cc_step.until.voltage_V else "")
            )
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                label=label,
                repetition=repetition,
                step=StepKind.cc,
                current_A=current,
                end=EndConditions(
                    time_s=cc_step.until.time_s,
                    voltage_V=cc_step.until.voltage_V,
                    capacity_Ah=cc_step.until.capacity_Ah,
                    dvdt_V_per_h=cc_step.until.dvdt_V_per_h,
                    twin_soc=cc_step.until.twin_soc,
                ),
                limits=_step_limits(limits, bound if cc_step.until.time_s is None else None),
                sample_interval_s=interval,
            )
        elif isinstance(item, CP):
            cp_step = item.cp
            _check_voltage(cp_step.until.voltage_V, limits, f"{where}.cp.until.voltage_V")
            bound = cp_step.until.time_s
            if bound is None:
                # The slowest the charge can go: the current P / V at the top of the voltage window.
                charge = cp_step.until.capacity_Ah or ctx.nominal_capacity_Ah
                if charge is None:
                    raise ProtocolError(f"{where}.cp: without until.time_s the step needs a capacity to bound its time")
                top_V = limits.voltage_max_V
                if top_V is None:
                    raise ProtocolError(
                        f"{where}.cp: without until.time_s the step needs voltage_max_V to bound its time"
                    )
                bound = CC_TIME_MARGIN * charge * top_V / abs(cp_step.power_W) * 3600.0
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                repetition=repetition,
                step=StepKind.cp,
                power_W=cp_step.power_W,
                label=cp_step.label
                or f"{'charge' if cp_step.power_W > 0 else 'discharge'} {abs(cp_step.power_W):.3g} W"
                + (f" to {cp_step.until.voltage_V:g} V" if cp_step.until.voltage_V else ""),
                end=EndConditions(
                    time_s=cp_step.until.time_s,
                    voltage_V=cp_step.until.voltage_V,
                    capacity_Ah=cp_step.until.capacity_Ah,
                    dvdt_V_per_h=cp_step.until.dvdt_V_per_h,
                    twin_soc=cp_step.until.twin_soc,
                ),
                limits=_step_limits(limits, bound if cp_step.until.time_s is None else None),
                sample_interval_s=interval,
            )
        elif isinstance(item, CV):
            cv_step = item.cv
            _check_voltage(cv_step.voltage_V, limits, f"{where}.cv.voltage_V")
            threshold = cv_step.until.current_A
            if cv_step.until.c_rate is not None:
                threshold = _current_A(cv_step.until.c_rate, None, ctx, f"{where}.cv.until")
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                label=cv_step.label or f"hold {cv_step.voltage_V:g} V",
                repetition=repetition,
                step=StepKind.cv,
                voltage_V=cv_step.voltage_V,
                end=EndConditions(
                    time_s=cv_step.until.time_s,
                    current_A=threshold,
                    capacity_Ah=cv_step.until.capacity_Ah,
                    twin_soc=cv_step.until.twin_soc,
                ),
                limits=_step_limits(limits, CV_DEFAULT_MAX_S if cv_step.until.time_s is None else None),
                sample_interval_s=interval,
            )
        elif isinstance(item, CCCV):
            cccv_step = item.cccv
            current = _current_A(cccv_step.c_rate, cccv_step.current_A, ctx, f"{where}.cccv")
            _check_current(current, limits, f"{where}.cccv")
            _check_voltage(cccv_step.voltage_V, limits, f"{where}.cccv.voltage_V")
            threshold = cccv_step.until.current_A
            if cccv_step.until.c_rate is not None:
                threshold = _current_A(cccv_step.until.c_rate, None, ctx, f"{where}.cccv.until")
            bound = cccv_step.until.time_s or (
                CC_TIME_MARGIN * (ctx.nominal_capacity_Ah or 0) / abs(current) * 3600.0 + CV_DEFAULT_MAX_S
            )
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                repetition=repetition,
                step=StepKind.cccv,
                current_A=current,
                voltage_V=cccv_step.voltage_V,
                label=cccv_step.label
                or f"{'charge' if current > 0 else 'discharge'} {current:.3g} A to {cccv_step.voltage_V:g} V, hold",
                end=EndConditions(
                    time_s=cccv_step.until.time_s, current_A=threshold, twin_soc=cccv_step.until.twin_soc
                ),
                limits=_step_limits(limits, bound if cccv_step.until.time_s is None else None),
                sample_interval_s=interval,
            )
        elif isinstance(item, GITT):
            gitt_step = item.gitt
            current = _current_A(gitt_step.c_rate, gitt_step.current_A, ctx, f"{where}.gitt")
            _check_current(current, limits, f"{where}.gitt")
            _check_voltage(gitt_step.until_voltage_V, limits, f"{where}.gitt.until_voltage_V")
            charge = ctx.nominal_capacity_Ah
            pulses = gitt_step.max_pulses
            per_pulse_Ah = abs(current) * gitt_step.pulse_s / 3600.0
            if charge is not None and per_pulse_Ah > 0:
                enough = CC_TIME_MARGIN * charge / per_pulse_Ah
                if math.isfinite(enough):
                    pulses = min(pulses, int(enough) + 1)
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                repetition=repetition,
                step=StepKind.gitt,
                current_A=current,
                label=gitt_step.label
                or f"GITT {current:.3g} A x {gitt_step.pulse_s:g} s / {gitt_step.relax_s:g} s to {gitt_step.until_voltage_V:g} V",
                end=EndConditions(voltage_V=gitt_step.until_voltage_V),
                gitt=GittSettings(pulse_s=gitt_step.pulse_s, relax_s=gitt_step.relax_s, max_pulses=pulses),
                limits=_step_limits(limits, pulses * (gitt_step.pulse_s + gitt_step.relax_s) * 1.05),
                sample_interval_s=min(interval, gitt_step.pulse_s / 5, gitt_step.relax_s / 5),
            )
        elif isinstance(item, Voltammetry):
            sweep_step = item.cyclic_voltammetry
            rates = (
                sweep_step.scan_rate_V_s if isinstance(sweep_step.scan_rate_V_s, list) else [sweep_step.scan_rate_V_s]
            )
            for name in ("start_V", "vertex_1_V", "vertex_2_V"):
                _check_voltage(getattr(sweep_step, name), limits, f"{where}.cyclic_voltammetry.{name}")
            for rate in rates:
                if sweep_step.hold_start_s > 0:
                    emit_step(
                        StepCommand(
                            run_id=ctx.run_id,
                            step_index=step_count[0],
                            repetition=repetition,
                            step=StepKind.cv,
                            label=f"hold {sweep_step.start_V:g} V before {rate * 1e3:g} mV/s",
                            voltage_V=sweep_step.start_V,
                            end=EndConditions(time_s=sweep_step.hold_start_s),
                            limits=_step_limits(limits, None),
                            sample_interval_s=min(interval, sweep_step.hold_start_s / 10),
                        ),
                        None,
                        loops,
                        where,
                    )
                sweep = SweepSettings(
                    start_V=sweep_step.start_V,
                    vertex_1_V=sweep_step.vertex_1_V,
                    vertex_2_V=sweep_step.vertex_2_V,
                    scan_rate_V_s=rate,
                    cycles=sweep_step.cycles,
                    step_V=sweep_step.step_V,
                )
                emit_step(
                    StepCommand(
                        run_id=ctx.run_id,
                        step_index=step_count[0],
                        repetition=repetition,
                        step=StepKind.cyclic_voltammetry,
                        label=sweep_step.label
                        or f"CV {rate * 1e3:g} mV/s {sweep_step.vertex_1_V:g}-{sweep_step.vertex_2_V:g} V",
                        # A backstop, not a schedule: a device-run sweep on a loaded host or a slow link reports late.
                        sweep=sweep,
                        limits=_step_limits(limits, _sweep_duration_s(sweep) * 1.5 + 30),
                        sample_interval_s=sweep_step.step_V / rate,
                    ),
                    sweep_step if rate == rates[-1] else None,
                    loops,
                    where,
                )
            return
        elif isinstance(item, EIS):
            eis_step = item.eis
            settings = EisSettings(
                mode=eis_step.mode,
                f_start_Hz=eis_step.f_start_Hz,
                f_end_Hz=eis_step.f_end_Hz,
                points_per_decade=eis_step.points_per_decade,
                amplitude=eis_step.amplitude,
            )
            cmd = StepCommand(
                run_id=ctx.run_id,
                step_index=index,
                repetition=repetition,
                step=StepKind.eis,
                eis=settings,
                label=eis_step.label or f"EIS {eis_step.f_start_Hz:g}-{eis_step.f_end_Hz:g} Hz",
                limits=_step_limits(limits, settings.duration_s() * 1.5 + 60),
                sample_interval_s=1.0,
            )
        else:  # pragma: no cover
            raise ProtocolError(f"{where}: unknown step")
        emit_step(cmd, step_model, loops, where)

    n_loops = [0]

    def walk(items, repetition: int, where: str, loops: tuple[int, ...]) -> None:
        for k, item in enumerate(items):
            here = f"{where}[{k}]"
            if isinstance(item, Repeat):
                in_repeat[0] += 1
                for n in range(item.repeat):
                    walk(item.steps, repetition + n + 1 if repetition == 0 else repetition, f"{here}.steps", loops)
                in_repeat[0] -= 1
            elif isinstance(item, Group):
                add_tag(item.group, here)
                walk(item.steps, repetition, f"{here}.steps", loops)
            elif isinstance(item, Loop):
                loop = n_loops[0]
                n_loops[0] += 1
                add_tag(item.tag, here)
                start = len(instructions)
                instructions.append(LoopStart(loop, loops))
                # Repetitions inside a loop are the loop's iterations, counted as it runs (the Interpreter).
                walk(item.steps, repetition, f"{here}.steps", (*loops, loop))
                instructions.append(LoopEnd(loop, start, item.loop.until, item.loop.max_cycles, loops))
            else:
                emit(item, repetition, here, loops)

    walk(protocol.method, 0, "method", ())
    _check_gotos(instructions, tags)
    return Program(instructions, tags, protocol.stop_when)


def _check_gotos(instructions: list, tags: dict[str, int]) -> None:
    """Every goto names a tag, and jumps within its loop or out of it, never into a loop from outside
    (the loop's iteration count would be undefined)."""
    for instr in instructions:
        if not isinstance(instr, StepInstr):
            continue
        for condition, action in instr.then.items():
            if not isinstance(action, Goto):
                continue
            where = f"step {instr.command.step_index} ({instr.command.label}) then.{condition}"
            if action.goto not in tags:
                known = ", ".join(sorted(tags)) or "none defined"
                raise ProtocolError(
                    f"{where}: goto {action.goto!r}: no step, loop or group has that tag (tags: {known})"
                )
            target = instructions[tags[action.goto]]
            if target.loops != instr.loops[: len(target.loops)]:
                raise ProtocolError(
                    f"{where}: goto {action.goto!r} jumps into a loop from outside it; go to the loop's own tag instead"
                )


def _sweep_duration_s(sweep) -> float:
    """SweepSettings.duration_s from the count of its potentials, without making the list of them."""
    points = sweep_points(sweep.start_V, sweep.vertex_1_V, sweep.vertex_2_V, sweep.cycles, sweep.step_V)
    return points * sweep.step_V / sweep.scan_rate_V_s


def _step_limits(limits: Limits, step_time_max_s: float | None) -> Limits:
    if step_time_max_s is None:
        return limits
    if not math.isfinite(step_time_max_s):
        raise ProtocolError(
            "its time bound is not a finite number (a rate, current or power too small for its end): "
            "give until.time_s or a larger setpoint"
        )
    return limits.tighten(Limits(step_time_max_s=step_time_max_s))


def _check_current(current_A: float, limits: Limits, where: str) -> None:
    if limits.current_max_A is not None and abs(current_A) > limits.current_max_A:
        raise ProtocolError(
            f"{where}: current {current_A:.6g} A exceeds current_max_A {limits.current_max_A:g} A; "
            "lower the current or raise the limit (the channel's own limit cannot be exceeded)"
        )


def _check_voltage(voltage_V: float | None, limits: Limits, where: str) -> None:
    if voltage_V is None:
        return
    if limits.voltage_max_V is not None and voltage_V > limits.voltage_max_V:
        raise ProtocolError(
            f"{where}: {voltage_V:g} V is above the safety limit voltage_max_V {limits.voltage_max_V:g} V"
        )
    if limits.voltage_min_V is not None and voltage_V < limits.voltage_min_V:
        raise ProtocolError(
            f"{where}: {voltage_V:g} V is below the safety limit voltage_min_V {limits.voltage_min_V:g} V"
        )
