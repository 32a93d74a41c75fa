"""BioLogic EC-Lab files: ``.mpr`` binaries, read with galvani (GPL-3.0, the optional ``biologic`` extra).

One reader for the techniques a battery lab records (GCPL, MB, OCV, PEIS/GEIS, CA/CP), which store different
columns: each quantity is taken from the best column the file has (``_current_mA`` says which, and why).

- Time is ``time/s``; voltage ``Ewe/V``, else ``<Ewe>/V`` (the mean over the interval, what PEIS stores).
- The step is EC-Lab's sequence number ``Ns``, and a new one wherever ``half cycle`` changes too (a GCPL loop
  can repeat one sequence).
- Cycles: ``cycle number`` where the file has it (EC-Lab counts from 0, labtwin from 1, so +1); else from
  ``half cycle`` as EC-Lab pairs them, two half cycles to a cycle (``half cycle // 2 + 1``); else none, and
  labtwin.data.replay numbers them from the charge each step moved.
- Net charge is ``(Q-Qo)/mA.h`` where present (the instrument's own count), else counted from the current.
- Impedance rows carry ``freq/Hz`` > 0 with ``Re(Z)/Ohm`` and ``-Im(Z)/Ohm``, or ``|Z|/Ohm`` and
  ``Phase(Z)/deg``.

EC-Lab's current is positive for oxidation at the working electrode: for a cell wired with its positive
electrode as working electrode that is charge, labtwin's sign, so no flip (the same holds for ``dq``,
``(Q-Qo)`` and the control set point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from labtwin.formats.recording import Recording, RecordingError, finish

# EC-Lab's mode bits in the packed ``flags`` byte (galvani's VMPdata_colID_flag_map "mode", mask 0x03).
MODE_MASK = 0x03
GALVANOSTATIC, POTENTIOSTATIC, REST = 1, 2, 3
MEASURED_CURRENT = ("I/mA", "<I>/mA")
CURRENT_CONTROL = ("control/mA", "control/V/mA")  # "control/V/mA" holds mA on galvanostatic rows
CURRENT_SOURCES = "I/mA or <I>/mA, or a current control column (control/mA, control/V/mA) with the mode flags, or dq/mA.h or (Q-Qo)/mA.h"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _mode(mpr: Any, data: np.ndarray) -> np.ndarray | None:
    names = data.dtype.names or ()
    if "flags" not in names or "mode" not in getattr(mpr, "flags_dict", {}):
        return None
    return np.asarray(data["flags"], dtype=np.uint8) & MODE_MASK


def _rate_from_charge_mA(data: np.ndarray, time_s: np.ndarray) -> np.ndarray | None:
    """dQ/dt in mA: each row's charge increment over the interval since the row before (its mean current)."""
    names = data.dtype.names or ()
    if "dq/mA.h" in names:
        dq_mAh = np.asarray(data["dq/mA.h"], dtype=float)
    elif "(Q-Qo)/mA.h" in names:
        q = np.asarray(data["(Q-Qo)/mA.h"], dtype=float)
        dq_mAh = np.diff(q, prepend=q[:1])
    else:
        return None
    dt = np.diff(time_s, prepend=time_s[:1])
    return np.where(dt > 0, dq_mAh * 3600.0 / np.where(dt > 0, dt, 1.0), 0.0)


def _current_mA(
    path: Path, data: np.ndarray, mode: np.ndarray | None, time_s: np.ndarray
) -> tuple[np.ndarray, str | None]:
    """The current in mA, and which columns it was derived from when the file stores none (for the notes).

    In order of preference:

    1. ``I/mA`` or ``<I>/mA``: measured (MB, CA, CP, PEIS store it).
    2. A GCPL file stores no current, only its set point (``control/V/mA``) and the charge each row moved
       (``dq/mA.h``). On galvanostatic rows (mode 1) the set point is the current the galvanostat drove, exact
       and without the noise of a difference quotient; on rest rows (mode 3) the current is zero, whatever the
       control column says (EC-Lab shows the next step's set point there). An OCV file, all rest, has zero
       current.
    3. Rows left over (potentiostatic, mode 2, where the control column is a voltage; or a file without mode
       flags): dQ/dt from ``dq/mA.h`` or the differences of ``(Q-Qo)/mA.h``, the mean current over each interval.
    """
    names = data.dtype.names or ()
    for column in MEASURED_CURRENT:
        if column in names:
            return np.asarray(data[column], dtype=float), None
    n = len(data)
    current = np.full(n, np.nan)
    used: list[str] = []
    if mode is not None:
        rest = mode == REST
        current[rest] = 0.0
        if rest.any():
            used.append(f"zero on the {int(rest.sum())} rest rows")
        control = next((c for c in CURRENT_CONTROL if c in names), None)
        galvanostatic = mode == GALVANOSTATIC
        if control is not None and galvanostatic.any():
            current[galvanostatic] = np.asarray(data[control], dtype=float)[galvanostatic]
            used.append(f"the set point {control} on the {int(galvanostatic.sum())} galvanostatic rows")
    left = np.isnan(current)
    if left.any():
        rate = _rate_from_charge_mA(data, time_s)
        if rate is not None:
            current[left] = rate[left]
            source = "dq/mA.h" if "dq/mA.h" in names else "(Q-Qo)/mA.h"
            used.append(f"dQ/dt from {source} on the {int(left.sum())} other rows")
    if np.isnan(current).any():
        raise RecordingError(
            f"{path}: no current for {int(np.isnan(current).sum())} of {n} rows: needs {CURRENT_SOURCES}; "
            f"columns are {list(names)}"
        )
    return current, "current (the file stores none): " + ", ".join(used)


def _steps(data: np.ndarray) -> np.ndarray:
    names = data.dtype.names or ()
    n = len(data)
    keys = [np.asarray(data[c], dtype=np.int64) for c in ("Ns", "half cycle") if c in names]
    if not keys:
        return np.zeros(n, int)
    changed = np.zeros(max(n - 1, 0), dtype=bool)
    for k in keys:
        changed |= k[1:] != k[:-1]
    return np.concatenate([[0], np.cumsum(changed)]).astype(int)


def _cycles(data: np.ndarray) -> np.ndarray | None:
    names = data.dtype.names or ()
    if "cycle number" in names:
        return np.rint(np.asarray(data["cycle number"], dtype=float)).astype(int) + 1
    if "half cycle" in names:
        return np.asarray(data["half cycle"], dtype=np.int64) // 2 + 1
    return None


def _impedance(data: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    names = data.dtype.names or ()
    if "freq/Hz" not in names:
        return None, None, None
    freq = np.asarray(data["freq/Hz"], dtype=float)
    is_z = freq > 0
    if "Re(Z)/Ohm" in names and "-Im(Z)/Ohm" in names:
        real = np.asarray(data["Re(Z)/Ohm"], dtype=float)
        imag = -np.asarray(data["-Im(Z)/Ohm"], dtype=float)
    elif "|Z|/Ohm" in names and "Phase(Z)/deg" in names:
        modulus = np.asarray(data["|Z|/Ohm"], dtype=float)
        phase = np.radians(np.asarray(data["Phase(Z)/deg"], dtype=float))
        real, imag = modulus * np.cos(phase), modulus * np.sin(phase)
    else:
        return None, None, None
    return np.where(is_z, freq, np.nan), np.where(is_z, real, np.nan), np.where(is_z, imag, np.nan)


def read_mpr(path: Path) -> Recording:
    try:
        from galvani import BioLogic
    except ImportError as exc:
        raise RecordingError(f"{path}: reading .mpr needs galvani: pip install 'labtwin[biologic]'") from exc
    try:
        mpr = BioLogic.MPRfile(str(path))
        data = mpr.data
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable EC-Lab .mpr file ({_one_line(exc)})") from None
    names = list(data.dtype.names or ())
    if len(data) == 0:
        raise RecordingError(f"{path}: no data rows; columns are {names}")
    if "time/s" not in names:
        raise RecordingError(f"{path}: column 'time/s' missing; columns are {names}")
    voltage = next((c for c in ("Ewe/V", "<Ewe>/V") if c in names), None)
    if voltage is None:
        raise RecordingError(f"{path}: no voltage column (needs 'Ewe/V' or '<Ewe>/V'); columns are {names}")
    time_s = np.asarray(data["time/s"], dtype=float)
    current_mA, source = _current_mA(path, data, _mode(mpr, data), time_s)
    f, zr, zi = _impedance(data)
    q = np.asarray(data["(Q-Qo)/mA.h"], dtype=float) / 1e3 if "(Q-Qo)/mA.h" in names else None
    start = getattr(mpr, "timestamp", None)
    unix_start = float(start.timestamp()) if start is not None and start.tzinfo is not None else None
    notes = [] if source is None else [source]
    if start is not None and unix_start is None:
        from datetime import UTC

        unix_start = float(start.replace(tzinfo=UTC).timestamp())
        notes.append(f"the file's clock has no time zone: its start ({start}) is taken as UTC")
    rec = finish(
        path.stem,
        "biologic-mpr",
        time_s,
        data[voltage],
        current_mA / 1e3,
        _steps(data),
        _cycles(data),
        q,
        None,
        f,
        zr,
        zi,
        unix_start_s=unix_start,
    )
    rec.notes.extend(notes)
    return rec
