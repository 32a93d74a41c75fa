"""BioLogic EC-Lab files: ``.mpr`` binaries, read with galvani (GPL-3.0, the optional ``biologic`` extra).

``Ns`` is the step; impedance rows carry ``freq/Hz``, ``|Z|/Ohm``, ``Phase(Z)/deg``. EC-Lab's ``I/mA`` is
positive for oxidation at the working electrode: for a cell wired with its positive electrode as working
electrode that is charge, labtwin's sign, so no flip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labtwin.formats.recording import Recording, RecordingError, finish


def read_mpr(path: Path) -> Recording:
    try:
        from galvani import BioLogic
    except ImportError as exc:  # pragma: no cover - galvani is a dependency
        raise RecordingError("reading .mpr needs galvani: pip install galvani") from exc
    try:
        data = BioLogic.MPRfile(str(path)).data
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable EC-Lab .mpr file ({exc})") from exc
    names = data.dtype.names or ()
    for needed in ("time/s", "Ewe/V", "I/mA"):
        if needed not in names:
            raise RecordingError(f"{path}: column {needed!r} missing; columns are {list(names)}")
    step = data["Ns"] if "Ns" in names else np.zeros(len(data), int)
    f = zr = zi = None
    if "freq/Hz" in names and "|Z|/Ohm" in names and "Phase(Z)/deg" in names:
        freq = np.asarray(data["freq/Hz"], float)
        is_z = freq > 0
        modulus, phase = np.asarray(data["|Z|/Ohm"], float), np.radians(np.asarray(data["Phase(Z)/deg"], float))
        f = np.where(is_z, freq, np.nan)
        zr = np.where(is_z, modulus * np.cos(phase), np.nan)
        zi = np.where(is_z, modulus * np.sin(phase), np.nan)
    q = np.asarray(data["(Q-Qo)/mA.h"], float) / 1e3 if "(Q-Qo)/mA.h" in names else None
    return finish(
        path.stem,
        "biologic-mpr",
        data["time/s"],
        data["Ewe/V"],
        np.asarray(data["I/mA"], float) / 1e3,
        step,
        None,
        q,
        None,
        f,
        zr,
        zi,
    )
