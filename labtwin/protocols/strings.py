"""PyBaMM-style step strings as sugar for typed steps, and typed steps back to PyBaMM's Experiment.

A method entry may be a plain sentence, as PyBaMM's ``Experiment`` takes
them; it is parsed into the same typed step a mapping would give, so
everything downstream (limits, compile, the agent) sees one language:

    method:
      - Rest for 1 hour
      - Discharge at C/10 until 1.0 V
      - Charge at 0.5C for 2 hours or until 4.2 V
      - Hold at 4.2 V until C/50
      - Charge at 1 mA until 4.1 V

Grammar: ``Rest for <time>``; ``Charge|Discharge at <current> [for <time>]
[or] [until <voltage>]``; ``Hold at <voltage> [for <time>] [or] [until
<current>]``. Currents in A or mA or as C-rates (``C/10``, ``0.5C``, ``2 C``);
voltages in V or mV; times in seconds, minutes, hours or days. Discharge is
negative current, as everywhere in labtwin. Constant power ("Discharge at
2 mW until 2.5 V") becomes a ``cp`` step; constant resistance ("at 10 Ohm")
is a PyBaMM step labtwin does not run, refused with that reason.
"""

from __future__ import annotations

import re

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
TIME_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "day": 86400.0,
    "days": 86400.0,
}


MAX_SENTENCE = 500


class StepStringError(ValueError):
    pass


def _time_s(text: str) -> float:
    match = re.fullmatch(rf"({NUMBER})\s*([a-z]+)", text.strip().lower())
    if not match or match.group(2) not in TIME_UNITS:
        raise StepStringError(f"{text!r} is not a time: write e.g. '30 minutes', '2 hours', '600 seconds'")
    return float(match.group(1)) * TIME_UNITS[match.group(2)]


def _current(text: str) -> dict:
    """``{"current_A": x}`` or ``{"c_rate": x}`` (magnitudes)."""
    t = text.strip()
    if m := re.fullmatch(r"C\s*/\s*(" + NUMBER + ")", t):
        if float(m.group(1)) == 0:
            raise StepStringError(f"{t!r}: C/0 is no current: write e.g. 'C/10'")
        return {"c_rate": 1.0 / float(m.group(1))}
    if m := re.fullmatch(rf"({NUMBER})\s*C", t):
        return {"c_rate": float(m.group(1))}
    if m := re.fullmatch(rf"({NUMBER})\s*(mA|A)", t):
        return {"current_A": float(m.group(1)) * (1e-3 if m.group(2) == "mA" else 1.0)}
    if m := re.fullmatch(rf"({NUMBER})\s*(W|mW)", t):
        return {"power_W": float(m.group(1)) * (1e-3 if m.group(2) == "mW" else 1.0)}
    if re.fullmatch(rf"{NUMBER}\s*(Ohm|ohm|Ω)", t):
        raise StepStringError(f"{t!r}: constant resistance steps are not supported by labtwin yet")
    raise StepStringError(f"{t!r} is not a current: write e.g. 'C/10', '0.5C', '1 A', '20 mA'")


def _voltage_V(text: str) -> float:
    m = re.fullmatch(rf"({NUMBER})\s*(mV|V)", text.strip())
    if not m:
        raise StepStringError(f"{text!r} is not a voltage: write e.g. '4.2 V' or '3600 mV'")
    return float(m.group(1)) * (1e-3 if m.group(2) == "mV" else 1.0)


def _conditions(rest: str) -> tuple[str | None, str | None]:
    """Split ``for <time> [or] until <x>`` into its time and its until parts."""
    rest = rest.strip()
    m = re.fullmatch(r"(?:for\s+(?P<time>.+?))?\s*(?:\bor\b)?\s*(?:until\s+(?P<until>.+))?", rest)
    if not m or not rest:
        raise StepStringError("needs 'for <time>' and/or 'until <condition>'")
    return m.group("time"), m.group("until")


def parse_step_string(text: str) -> dict:
    """One sentence into the mapping a typed step is made from (the sentence is kept as the label).

    At most MAX_SENTENCE characters: the patterns below backtrack, so their cost grows with the square of the
    length, and a sentence of a megabyte would take hours (issue 14: the loader never hangs)."""
    if len(text) > MAX_SENTENCE:
        raise StepStringError(
            f"a step sentence of {len(text)} characters: at most {MAX_SENTENCE}; write a long step as a mapping"
        )
    s = " ".join(text.split())
    if m := re.fullmatch(r"(?i)rest\s+for\s+(.+)", s):
        return {"rest": {"duration_s": _time_s(m.group(1)), "label": s}}
    if m := re.fullmatch(r"(?i)(charge|discharge)\s+at\s+(.+?)\s+((?:for|until)\s+.+)", s):
        direction = -1.0 if m.group(1).lower() == "discharge" else 1.0
        setpoint = {k: direction * v for k, v in _current(m.group(2)).items()}
        duration, until = _conditions(m.group(3))
        end: dict = {}
        if duration:
            end["time_s"] = _time_s(duration)
        if until:
            end["voltage_V"] = _voltage_V(until)
        return {"cp" if "power_W" in setpoint else "cc": {**setpoint, "until": end, "label": s}}
    if m := re.fullmatch(r"(?i)hold\s+at\s+(.+?)\s+((?:for|until)\s+.+)", s):
        voltage = _voltage_V(m.group(1))
        duration, until = _conditions(m.group(2))
        end = {}
        if duration:
            end["time_s"] = _time_s(duration)
        if until:
            threshold = _current(until)
            if "power_W" in threshold:
                raise StepStringError(f"{until!r}: a hold ends on a current, not a power")
            end.update(threshold)
        return {"cv": {"voltage_V": voltage, "until": end, "label": s}}
    raise StepStringError(
        f"{text!r}: not a step sentence; write e.g. 'Rest for 1 hour', 'Discharge at C/10 until 1.0 V', "
        "'Charge at 1 A for 30 minutes or until 4.2 V', 'Hold at 4.2 V until C/50'"
    )


# --------------------------------------------------------------------------- export


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _time_or_voltage(until, where: str) -> str:
    """A cc or cp step's "for <time> or until <voltage>"; the end conditions PyBaMM has no words for are
    refused by name rather than dropped."""
    unsupported = [k for k in ("capacity_Ah", "dvdt_V_per_h", "twin_soc") if getattr(until, k) is not None]
    if unsupported:
        raise StepStringError(f"{where}: end condition {', '.join(unsupported)} has no PyBaMM step string")
    parts = []
    if until.time_s is not None:
        parts.append(f"for {_fmt(until.time_s)} seconds")
    if until.voltage_V is not None:
        parts.append(f"until {_fmt(until.voltage_V)} V")
    return " or ".join(parts)


def _current_text(current_A: float | None, c_rate: float | None) -> str:
    if c_rate is not None:
        return f"{_fmt(abs(c_rate))}C"
    return f"{_fmt(abs(_set(current_A, 'current_A or c_rate')))} A"


def _set(value: float | None, what: str) -> float:
    """A value the step model requires (one of current_A and c_rate, say): here only to say so to the types."""
    if value is None:
        raise StepStringError(f"the step has no {what}")
    return value


def _direction(current_A: float | None, c_rate: float | None) -> str:
    """Charge or Discharge by the sign of whichever of the two the step sets (positive charges the cell)."""
    sign = current_A if current_A is not None else _set(c_rate, "current_A or c_rate")
    return "Charge" if sign > 0 else "Discharge"


def to_pybamm(protocol) -> list:
    """The method as PyBaMM ``Experiment`` operating conditions: strings, with each ``repeat`` a tuple of its
    cycle's strings repeated (PyBaMM's cycle notation). Steps PyBaMM cannot express raise, naming them."""
    from labtwin.protocols.model import CC, CCCV, CP, CV, EIS, GITT, Group, Loop, Repeat, Rest, Voltammetry

    def one(item, where: str) -> list[str]:
        step = next(iter(item.__dict__.values()))
        if any(action != "next" for action in getattr(step, "then", {}).values()):
            raise StepStringError(f"{where}: then-actions (goto, stop, pause) have no PyBaMM Experiment equivalent")
        if isinstance(item, Rest) and item.rest.until is not None:
            raise StepStringError(f"{where}: a rest until dV/dt has no PyBaMM step string")
        if isinstance(item, Rest):
            return [f"Rest for {_fmt(item.rest.duration_s)} seconds"]
        if isinstance(item, CC):
            cc = item.cc
            text = f"{_direction(cc.current_A, cc.c_rate)} at {_current_text(cc.current_A, cc.c_rate)}"
            return [f"{text} {_time_or_voltage(cc.until, where)}"]
        if isinstance(item, CP):
            cp = item.cp
            return [
                f"{'Charge' if cp.power_W > 0 else 'Discharge'} at {_fmt(abs(cp.power_W))} W {_time_or_voltage(cp.until, where)}"
            ]
        if isinstance(item, CV):
            cv = item.cv
            parts = []
            if cv.until.time_s is not None:
                parts.append(f"for {_fmt(cv.until.time_s)} seconds")
            if cv.until.current_A is not None or cv.until.c_rate is not None:
                parts.append(f"until {_current_text(cv.until.current_A, cv.until.c_rate)}")
            return [f"Hold at {_fmt(cv.voltage_V)} V {' or '.join(parts)}"]
        if isinstance(item, CCCV):
            cccv = item.cccv
            hold = []
            if cccv.until.time_s is not None:
                hold.append(f"for {_fmt(cccv.until.time_s)} seconds")
            if cccv.until.current_A is not None or cccv.until.c_rate is not None:
                hold.append(f"until {_current_text(cccv.until.current_A, cccv.until.c_rate)}")
            return [
                f"{_direction(cccv.current_A, cccv.c_rate)} at {_current_text(cccv.current_A, cccv.c_rate)} until {_fmt(cccv.voltage_V)} V",
                f"Hold at {_fmt(cccv.voltage_V)} V {' or '.join(hold)}",
            ]
        if isinstance(item, (GITT, Voltammetry, EIS)):
            names: dict[type, str] = {GITT: "GITT", Voltammetry: "cyclic voltammetry", EIS: "EIS"}
            kind = names[type(item)]
            raise StepStringError(
                f"{where}: {kind} steps have no PyBaMM Experiment equivalent (export the cycling part)"
            )
        raise StepStringError(f"{where}: unknown step")  # pragma: no cover

    def flat(items, where: str) -> list[str]:
        """A cycle's strings; a repeat inside a cycle is spelled out (PyBaMM cycles do not nest)."""
        texts: list[str] = []
        for j, inner in enumerate(items):
            here = f"{where}[{j}]"
            if isinstance(inner, Repeat):
                texts.extend(flat(inner.steps, f"{here}.steps") * inner.repeat)
            elif isinstance(inner, Group):
                texts.extend(flat(inner.steps, f"{here}.steps"))
            elif isinstance(inner, Loop):
                raise StepStringError(
                    f"{here}: a loop until a condition has no PyBaMM Experiment equivalent "
                    "(write it as a repeat of max_cycles to cross-check)"
                )
            else:
                texts.extend(one(inner, here))
        return texts

    out: list = []
    for k, item in enumerate(protocol.method):
        where = f"method[{k}]"
        if isinstance(item, Repeat):
            out.extend([tuple(flat(item.steps, f"{where}.steps"))] * item.repeat)
        else:
            out.extend(
                flat(item.steps, f"{where}.steps")
                if isinstance(item, Group)
                else flat([item], "method")
                if isinstance(item, Loop)
                else one(item, where)
            )
    return out
