"""labtwin's per-cycle figures beside the peer tools' on the same real files (issue 16: "agree with it or say
exactly why they differ").

The peers do not install beside labtwin (navani needs numpy<2, BEEP numpy>=2, Aurora wants a project folder),
and they are not labtwin's dependencies, so each lives in a virtualenv of its own outside the repository and
this one script runs in two roles:

- in labtwin's venv (the default): reads every real file under tests/data with labtwin (``read_recording``,
  ``data.replay.documents``, ``analysis.cycles.summarize_cycles``: what ``labtwin analyze cycling`` prints), then
  runs itself under each peer's python with ``--peer NAME FILE...``, which prints the peer's per-cycle figures
  as JSON; it lines the cycles up, prints both side by side with the largest relative difference, and names
  the conventions that differ (numbering, pairing, CE formula, units, sign);
- under a peer's python (``--peer``): imports only that peer (never labtwin) and reports, per file, what the
  peer's own reader and its own per-cycle summary say, in Ah and as a fraction, with the peer's native units,
  CE formula and cycle numbering stated, or the peer's exact error.

Where a peer has no per-cycle summary of its own (batterydf, the Battery Data Alliance's BDF tooling, only reads
and converts), the bench integrates the peer's converted current per the file's cycle column, and says so.

Set up the peers (each once; about 5 min on these machines):

    python3 -m venv /tmp/peers-venv          && /tmp/peers-venv/bin/pip install navani
    python3 -m venv /tmp/peers-cellpy-venv   && /tmp/peers-cellpy-venv/bin/pip install cellpy
    python3 -m venv /tmp/peers-battdat-venv  && /tmp/peers-battdat-venv/bin/pip install battery-data-toolkit batterydf "pandas<3"
    python3 -m venv /tmp/peers-beep-venv     && /tmp/peers-beep-venv/bin/pip install beep
    python3 -m venv /tmp/peers-aurora-venv   && /tmp/peers-aurora-venv/bin/pip install aurora-cycler-manager
    XDG_DATA_HOME=/tmp/peers-aurora-home /tmp/peers-aurora-venv/bin/aurora-setup init /tmp/peers-aurora-home/project
    apt-get install mdbtools                 # Arbin .res, for navani, cellpy and labtwin alike

Run:

    .venv/bin/python bench/peer_compare.py                       # every file, every peer that is installed
    .venv/bin/python bench/peer_compare.py --peers navani,cellpy --files tests/data/neware/test.ndax
    .venv/bin/python bench/peer_compare.py --write-doc docs/peer-comparison.md   # refresh the doc's table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The real files (tests/data/README.md: origin and licence). tests/data/replay holds labtwin's own simulated
# files, tests/data/eis impedance only: neither is compared.
REAL_FILES = [
    "tests/data/bdf/faraday__lg-INR21700M50-2019-002__2019-06-02__rate__25degC__maccor.bdf.csv",
    "tests/data/neware/test.nda",
    "tests/data/neware/test.ndax",
    "tests/data/biologic/jdb11-1_c3_gcpl_5cycles_2V-3p8V_C-24_data_C09.mpr",
    "tests/data/biologic/00_test_04_MB_C01.mpr",
    "tests/data/biologic/00_test_01_OCV_C01.mpr",
    "tests/data/cycling/biol.mpr",
    "tests/data/arbin/arbin_example.csv",
    "tests/data/arbin/arbin_example.res",
    "tests/data/arbin/bs542_004_gr_li_50ua_50mv_1v_191020_Channel_11.xlsx",
    "tests/data/maccor/maccor_example.001",
    "tests/data/landt/NJK_CC_156_C30_C_x30.xlsx",
]

# Each peer's python (override with LABTWIN_PEER_<NAME>_PYTHON) and the environment it needs.
PEER_PYTHON = {
    "navani": "/tmp/peers-venv/bin/python",
    "cellpy": "/tmp/peers-cellpy-venv/bin/python",
    "battdat": "/tmp/peers-battdat-venv/bin/python",
    "batterydf": "/tmp/peers-battdat-venv/bin/python",
    "beep": "/tmp/peers-beep-venv/bin/python",
    "aurora": "/tmp/peers-aurora-venv/bin/python",
}
# Aurora reads a project config at import; this keeps it (and its SQLite) under /tmp, not in the user's home.
PEER_ENV = {"aurora": {"XDG_DATA_HOME": "/tmp/peers-aurora-home"}}
PEER_TIMEOUT_S = 900
PEER_CWD = Path(tempfile.gettempdir())

# How each peer numbers and pairs its cycles and computes CE, from its source (quoted in docs/peer-comparison.md).
PEER_RULES = {
    "navani": "half cycles from the current's sign (rests skipped), full cycle = ceil(half/2): cycle 1 is the "
    "first two directions in file order, whatever they are; capacity = the largest of the per-half-cycle "
    "capacity in each direction; CE = charge / discharge always",
    "cellpy": "the file's own cycle column (Arbin Cycle_Index, Neware cycle, EC-Lab cycle); capacity = the "
    "raw charge/discharge counters at each cycle's last row; CE = charge / discharge (default cycle_mode "
    "'anode'), in %",
    "battdat": "the file's cycle column less its smallest value (cycles from 0); capacity = the trapezoid of "
    "the current over each cycle split at its extreme state of charge (CapacityPerCycle); no CE: the "
    "bench takes discharge / charge",
    "batterydf": "reads and converts to BDF only (no per-cycle summary): the bench integrates batterydf's "
    "'Current / A' over 'Test Time / s' by sign within each 'Cycle Count / 1' (one cycle where there is none); "
    "CE = discharge / charge",
    "beep": "the file's cycle_index; capacity = the largest of the file's charge/discharge counters in each "
    "cycle (summarize_cycles); no CE in the regular summary: the bench takes discharge / charge",
    "aurora": "steps = runs of the file's cycle number (EC-Lab half cycle // 2, Neware cycle); a step is a "
    "cycle only when it has >10 rows, >5 positive and >5 negative, CE > 1 %, numbered from 1; capacity = "
    "trapezoid of the current (rows > 600 s apart add nothing); CE = discharge / charge, in %",
}

PEER_VERSION_DIST = {
    "navani": "navani",
    "cellpy": "cellpy",
    "battdat": "battery-data-toolkit",
    "batterydf": "batterydf",
    "beep": "beep",
    "aurora": "aurora-cycler-manager",
}


# ----------------------------------------------------------------------------------------------------------
# Peer role: runs under the peer's python, imports the peer only.
# ----------------------------------------------------------------------------------------------------------


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _cycle_rows(cycles, charge, discharge, ce, scale_Ah: float, ce_scale: float) -> list[dict]:
    out = []
    for c, q_in, q_out, e in zip(cycles, charge, discharge, ce):
        q_in, q_out, e = _num(q_in), _num(q_out), _num(e)
        out.append(
            {
                "cycle": int(c),
                "charge_Ah": None if q_in is None else q_in * scale_Ah,
                "discharge_Ah": None if q_out is None else q_out * scale_Ah,
                "ce": None if e is None else e / ce_scale,
            }
        )
    return out


def _ratio(a, b):
    a, b = _num(a), _num(b)
    return a / b if a is not None and b not in (None, 0.0) else None


def peer_navani(path: str) -> dict:
    import navani.echem as ec

    df = ec.echem_file_loader(path)
    s = ec.cycle_summary(df)
    # navani's docstring says mAh; its .res path adds Arbin's Charge_/Discharge_Capacity (Ah) without the x1000
    # its .xlsx path applies, so .res figures are Ah.
    unit = "Ah" if path.lower().endswith(".res") else "mAh"
    scale = 1.0 if unit == "Ah" else 1e-3
    get = lambda col: s[col].tolist() if col in s.columns else [None] * len(s)  # noqa: E731
    return {
        "native_units": f"capacity {unit}, CE fraction",
        "cycles": _cycle_rows(
            s.index.tolist(), get("Charge Capacity"), get("Discharge Capacity"), get("CE"), scale, 1.0
        ),
    }


CELLPY_INSTRUMENT = {
    ".res": "arbin_res",
    ".mpr": "biologics_mpr",
    ".nda": "neware_nda",
    ".ndax": "neware_nda",
    ".001": "maccor_txt",
    ".csv": "arbin_sql_csv",
    ".xlsx": "arbin_sql_xlsx",
}


def peer_cellpy(path: str) -> dict:
    import cellpy

    lower = path.lower()
    instrument = "batmo_bdf" if lower.endswith(".bdf.csv") else CELLPY_INSTRUMENT.get(Path(lower).suffix)
    if instrument is None:
        raise ValueError(f"cellpy has no instrument for {Path(path).suffix!r} files")
    cell = cellpy.get(path, instrument=instrument)
    s = cell.data.summary.reset_index()
    unit = cell.data.raw_units["charge"]
    scale = {"Ah": 1.0, "mAh": 1e-3}[unit]
    return {
        "instrument": instrument,
        "native_units": f"capacity {unit} (cellpy's raw_units), CE %",
        "cycle_mode": cell.cycle_mode,
        "cycles": _cycle_rows(
            s["cycle_index"], s["charge_capacity"], s["discharge_capacity"], s["coulombic_efficiency"], scale, 100.0
        ),
    }


def peer_battdat(path: str) -> dict:
    from battdat.io.arbin import ArbinReader
    from battdat.io.maccor import MACCORReader
    from battdat.postprocess.integral import CapacityPerCycle

    lower = path.lower()
    if lower.endswith(".csv") and not lower.endswith(".bdf.csv"):
        reader = ArbinReader()
    elif Path(lower).suffix[1:].isdigit():
        reader = MACCORReader()
    else:
        raise ValueError(f"battery-data-toolkit reads Arbin .csv and Maccor numbered text files, not {Path(path).name}")
    ds = reader.read_dataset([path])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = CapacityPerCycle().compute_features(ds)
    ce = [_ratio(d, c) for c, d in zip(f["capacity_charge"], f["capacity_discharge"])]
    return {
        "reader": type(reader).__name__,
        "native_units": "capacity Ah (CapacityPerCycle), no CE",
        "cycles": _cycle_rows(f["cycle_number"], f["capacity_charge"], f["capacity_discharge"], ce, 1.0, 1.0),
    }


def peer_batterydf(path: str) -> dict:
    import bdf
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = bdf.read(path)
    t = df["Test Time / s"].to_numpy(float)
    i = df["Current / A"].to_numpy(float)
    cyc = df["Cycle Count / 1"].to_numpy(float) if "Cycle Count / 1" in df.columns else np.ones(len(df))
    dq = np.concatenate([[0.0], 0.5 * (i[1:] + i[:-1]) * np.diff(t) / 3600.0])
    same = np.concatenate([[False], cyc[1:] == cyc[:-1]])
    dq = np.where(same, dq, 0.0)  # an increment spanning two cycles goes to neither
    cycles, charge, discharge = [], [], []
    for c in sorted(set(cyc.tolist())):
        m = cyc == c
        cycles.append(int(c))  # as the peer gives it, whole or not (the defects say which)
        charge.append(float(dq[m & (dq > 0)].sum()))
        discharge.append(float(-dq[m & (dq < 0)].sum()))
    ce = [_ratio(d, c) for c, d in zip(charge, discharge)]
    defects = []
    if np.any(np.diff(t) < 0):
        defects.append(f"its 'Test Time / s' goes back {int(np.sum(np.diff(t) < 0))} times (it restarts each step)")
    if "Cycle Count / 1" in df.columns:
        raw = df["Cycle Count / 1"].to_numpy(float)
        if np.any(raw != np.round(raw)):
            defects.append(f"its 'Cycle Count / 1' is not whole: {sorted(set(np.round(raw, 4).tolist()))[:4]}")
    if np.all(i[np.isfinite(i)] >= 0) and np.any(i > 0):
        defects.append("its 'Current / A' is never negative")
    return {
        "defects": defects,
        "columns": list(map(str, df.columns)),
        "rows": len(df),
        "native_units": "BDF columns (A, s); per-cycle figures integrated by the bench",
        "cycles": _cycle_rows(cycles, charge, discharge, ce, 1.0, 1.0),
        "samples": {"time_s": t.tolist(), "current_A": i.tolist(), "voltage_V": df["Voltage / V"].tolist()},
    }


def peer_beep(path: str) -> dict:
    from beep.structure.arbin import ArbinDatapath
    from beep.structure.cli import auto_load
    from beep.structure.maccor import MaccorDatapath

    how = "auto_load"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dp = auto_load(path)
        except ValueError as exc:
            # auto_load goes by file-name patterns (Arbin '.*CH.*\\.csv', Maccor '.*\\d{5,6}.*\\d{3}'): a file
            # named otherwise is refused whatever it holds, so the bench also tries the datapath a user would pick.
            lower = path.lower()
            if lower.endswith(".csv") and not lower.endswith(".bdf.csv"):
                cls = ArbinDatapath
            elif Path(lower).suffix[1:].isdigit():
                cls = MaccorDatapath
            else:
                raise
            how = f"auto_load refused it ({exc.args[0].rsplit('/', 1)[-1]}); {cls.__name__}.from_file"
            dp = cls.from_file(path)
        s = dp.summarize_cycles()
    s = s.reset_index(drop=True)
    ce = [_ratio(d, c) for c, d in zip(s["charge_capacity"], s["discharge_capacity"])]
    return {
        "datapath": type(dp).__name__,
        "how": how,
        "native_units": "capacity Ah (the file's counters), no CE",
        "cycles": _cycle_rows(s["cycle_index"], s["charge_capacity"], s["discharge_capacity"], ce, 1.0, 1.0),
    }


def peer_aurora(path: str) -> dict:
    from aurora_cycler_manager import analysis, eclab_harvester, neware_harvester

    p = Path(path)
    if p.suffix.lower() == ".mpr":
        df = eclab_harvester.get_mpr_data(p)[0]
    else:
        df = neware_harvester.get_neware_data(p)  # .ndax and Neware .xlsx; anything else is its own error
    merged, _ = analysis.merge_dfs([df])
    s, _ = analysis.analyse_cycles(merged, None, {"finished": True})
    return {
        "native_units": "capacity mAh, CE %",
        "cycles": _cycle_rows(
            s["Cycle"].to_list(),
            s["Charge capacity (mAh)"].to_list(),
            s["Discharge capacity (mAh)"].to_list(),
            s["Coulombic efficiency (%)"].to_list(),
            1e-3,
            100.0,
        ),
    }


PEERS = {
    "navani": peer_navani,
    "cellpy": peer_cellpy,
    "battdat": peer_battdat,
    "batterydf": peer_batterydf,
    "beep": peer_beep,
    "aurora": peer_aurora,
}


def run_peer(name: str, files: list[str]) -> None:
    """The peer role: one JSON object per file on stdout (the peer's own chatter goes to stderr)."""
    import contextlib
    import importlib.metadata
    import logging

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        version = importlib.metadata.version(PEER_VERSION_DIST[name])
    except importlib.metadata.PackageNotFoundError:
        version = None
    results = []
    for f in files:
        t0 = time.perf_counter()
        entry: dict = {"peer": name, "version": version, "file": f}
        try:
            with contextlib.redirect_stdout(sys.stderr):
                entry.update(PEERS[name](str(ROOT / f)))
            entry["ok"] = True
        except BaseException as exc:  # a peer may sys.exit or raise anything: it is the finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            entry["ok"] = False
            text = " ".join(str(exc).split()).replace(f"{ROOT}/", "")  # paths as the repository names them
            entry["error"] = f"{type(exc).__name__}: {text[:400]}"
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(entry)
    json.dump(results, sys.stdout)


# ----------------------------------------------------------------------------------------------------------
# labtwin role.
# ----------------------------------------------------------------------------------------------------------


def labtwin_cycles(path: Path) -> dict:
    """What ``labtwin analyze cycling FILE`` computes, with the recording for the row-level checks."""
    from labtwin.analysis.cycles import summarize_cycles
    from labtwin.data.replay import documents
    from labtwin.documents import StepEvent
    from labtwin.formats import read_recording

    rec = read_recording(path)
    events = [
        d
        for d in documents(rec, lab="analysis", channel="file", cell_id=path.stem)
        if isinstance(d, StepEvent) and d.event == "ended"
    ]
    cycles = summarize_cycles(events)
    return {
        "format": rec.source_format,
        "has_cycle": rec.has_cycle,
        "first_direction": cycles[0].first_direction if cycles else None,
        "rec": rec,
        "cycles": [
            {"cycle": c.cycle, "charge_Ah": c.charge_Ah, "discharge_Ah": c.discharge_Ah, "ce": c.coulombic_efficiency}
            for c in cycles
        ],
    }


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    scale = max(abs(a), abs(b))
    return 0.0 if scale < 1e-15 else abs(a - b) / scale


def _nonempty(rows: list[dict]) -> list[dict]:
    """Cycles that moved charge (a peer's trailing rest, labtwin's cycle 0 of an initial rest, count for neither)."""
    return [r for r in rows if (r["charge_Ah"] or 0.0) + (r["discharge_Ah"] or 0.0) > 1e-15]


def _align(lab: list[dict], peer: list[dict]) -> tuple[int, list[tuple[dict, dict]]]:
    """The offset (labtwin cycle = peer cycle + offset) under which the cycles agree best: the most figures
    within 1 % (each paired cycle's charge, discharge, and the charge it moved both ways, which is blind to sign
    and CE conventions), then the most cycles paired, then the smallest mean difference both ways, then the
    smallest shift."""
    best: tuple[tuple[int, int, float, int], int, list[tuple[dict, dict]]] | None = None
    for k in range(-3, 4):
        pairs = _pairs_for(lab, peer, k)
        if not pairs:
            continue
        diffs = [_rel(_throughput(lr), _throughput(pr)) or 0.0 for lr, pr in pairs]
        agreeing = sum(
            (_rel(lr[q], pr[q]) if lr[q] is not None and pr[q] is not None else 1.0) < 0.01
            for lr, pr in pairs
            for q in ("charge_Ah", "discharge_Ah")
        ) + sum(d < 0.01 for d in diffs)
        key = (-agreeing, -len(pairs), round(sum(diffs) / len(diffs), 6), abs(k))
        if best is None or key < best[0]:
            best = (key, k, pairs)
    return (0, []) if best is None else (best[1], best[2])


def _throughput(r: dict) -> float:
    return (r["charge_Ah"] or 0.0) + (r["discharge_Ah"] or 0.0)


def _pairs_for(lab: list[dict], peer: list[dict], k: int) -> list[tuple[dict, dict]]:
    by_cycle = {r["cycle"]: r for r in lab}
    return [(by_cycle[p["cycle"] + k], p) for p in peer if p["cycle"] + k in by_cycle]


def _ce_formula(rows: list[dict]) -> str | None:
    """Which ratio the peer's CE is, read from its own numbers."""
    votes = {"discharge/charge": 0, "charge/discharge": 0}
    for r in rows:
        c, d, e = r["charge_Ah"], r["discharge_Ah"], r["ce"]
        if not (c and d and e):
            continue
        if abs(e - d / c) <= 1e-6 * abs(e):
            votes["discharge/charge"] += 1
        elif abs(e - c / d) <= 1e-6 * abs(e):
            votes["charge/discharge"] += 1
    if not any(votes.values()):
        return None
    return max(votes, key=lambda k: votes[k])


def compare(lab: dict, peer: dict) -> dict:
    """Line the cycles up and name what differs."""
    lab_rows, peer_rows = _nonempty(lab["cycles"]), _nonempty(peer["cycles"])
    notes: list[str] = [f"read with {peer['how']}"] if "how" in peer else []
    notes += [f"peer defect: {d}" for d in peer.get("defects", [])]
    dropped = len(peer["cycles"]) - len(peer_rows)
    if dropped:
        empty = [r["cycle"] for r in peer["cycles"] if r not in peer_rows]
        notes.append(f"peer cycle(s) {empty} moved no charge (dropped)")
    tot = lambda rows, k: sum(r[k] or 0.0 for r in rows)  # noqa: E731
    lab_total = tot(lab_rows, "charge_Ah") + tot(lab_rows, "discharge_Ah")
    peer_total = tot(peer_rows, "charge_Ah") + tot(peer_rows, "discharge_Ah")
    unit_factor = 1.0
    if lab_total > 0 and peer_total > 0:
        ratio = peer_total / lab_total
        for f in (1e3, 1e-3, 1e6, 1e-6):
            if abs(ratio / f - 1) < 0.05:
                unit_factor = f
                notes.append(
                    f"units: the peer's figures are {f:g} x labtwin's in the unit it declares ({peer['native_units']}); "
                    "compared after dividing by that factor"
                )
    if unit_factor != 1.0:
        peer_rows = [
            {
                **r,
                "charge_Ah": None if r["charge_Ah"] is None else r["charge_Ah"] / unit_factor,
                "discharge_Ah": None if r["discharge_Ah"] is None else r["discharge_Ah"] / unit_factor,
            }
            for r in peer_rows
        ]
    # A peer that calls labtwin's charge its discharge (the same numbers, the directions swapped).
    swapped = False
    if lab_rows and peer_rows:
        same = abs(tot(peer_rows, "charge_Ah") - tot(lab_rows, "charge_Ah")) + abs(
            tot(peer_rows, "discharge_Ah") - tot(lab_rows, "discharge_Ah")
        )
        cross = abs(tot(peer_rows, "charge_Ah") - tot(lab_rows, "discharge_Ah")) + abs(
            tot(peer_rows, "discharge_Ah") - tot(lab_rows, "charge_Ah")
        )
        if cross < 0.01 * same:
            swapped = True
            notes.append("sign: the peer's charge is labtwin's discharge and vice versa (compared swapped)")
            peer_rows = [
                {**r, "charge_Ah": r["discharge_Ah"], "discharge_Ah": r["charge_Ah"], "ce": r["ce"]} for r in peer_rows
            ]
    offset, pairs = _align(lab_rows, peer_rows)
    first_peer = min((r["cycle"] for r in peer["cycles"]), default=None)
    if peer["cycles"]:
        notes.append(
            f"numbering: the peer's cycles run {first_peer}..{max(r['cycle'] for r in peer['cycles'])}, "
            f"labtwin's {min((r['cycle'] for r in lab['cycles']), default='-')}.."
            f"{max((r['cycle'] for r in lab['cycles']), default='-')}"
            + (f"; labtwin cycle = peer cycle {offset:+d}" if offset else "")
        )
    for name, rows in (("labtwin", lab_rows), ("peer", peer_rows)):
        if rows and (not rows[0]["charge_Ah"] or not rows[0]["discharge_Ah"]):
            notes.append(f"{name}'s first cycle goes one way only (a partial first half cycle counted as a cycle)")
    formula = _ce_formula(peer["cycles"]) if not swapped else None
    lab_formula = "discharge/charge" if lab["first_direction"] == "charge" else "charge/discharge"
    if formula and formula != lab_formula:
        notes.append(f"CE: the peer's is {formula}, labtwin's {lab_formula} (first direction {lab['first_direction']})")
    cap, ce, ce_same, through = 0.0, 0.0, 0.0, 0.0
    rows_out = []
    for lr, pr in pairs:
        dc = _rel(lr["charge_Ah"], pr["charge_Ah"])
        dd = _rel(lr["discharge_Ah"], pr["discharge_Ah"])
        de = _rel(lr["ce"], pr["ce"])
        # The peer's capacities under labtwin's CE convention: what is left of the CE difference once the formula is set.
        c, d = pr["charge_Ah"], pr["discharge_Ah"]
        peer_ce_lab = (
            None if not (c and d) or lr["ce"] is None else (d / c if lab["first_direction"] == "charge" else c / d)
        )
        dl = _rel(lr["ce"], peer_ce_lab)
        dt = _rel(_throughput(lr), _throughput(pr)) or 0.0
        through = max(through, dt)
        cap = max(cap, dc or 0.0, dd or 0.0)
        ce = max(ce, de or 0.0)
        ce_same = max(ce_same, dl or 0.0)
        rows_out.append((lr, pr, dc, dd, de, dl, dt))
    lab_c, lab_d = tot(lab_rows, "charge_Ah"), tot(lab_rows, "discharge_Ah")
    peer_c, peer_d = tot(peer_rows, "charge_Ah"), tot(peer_rows, "discharge_Ah")
    total_diff = max(_rel(lab_c, peer_c) or 0.0, _rel(lab_d, peer_d) or 0.0)
    if pairs and cap > 0.01 and total_diff < 0.01:
        notes.append(
            f"pairing: the file's totals agree within {total_diff:.2%} (charge {lab_c:.6g} vs {peer_c:.6g} Ah, "
            f"discharge {lab_d:.6g} vs {peer_d:.6g} Ah), so the per-cycle difference is where cycles are cut"
        )
    return {
        "offset": offset,
        "pairs": rows_out,
        "lab_cycles": len(lab_rows),
        "peer_cycles": len(peer_rows),
        "largest_capacity": cap,
        "largest_throughput": through,
        "largest_ce": ce,
        "largest_ce_same_formula": ce_same,
        "total_diff": total_diff,
        "notes": notes,
        "unit_factor": unit_factor,
        "swapped": swapped,
    }


def compare_samples(lab: dict, peer: dict) -> str | None:
    """Row-level check for a peer that returns its rows (batterydf): the same rows, voltage and current."""
    import numpy as np

    s = peer.get("samples")
    if not s:
        return None
    rec = lab["rec"]
    n_l, n_p = len(rec), len(s["time_s"])
    if n_l != n_p:
        return f"rows: labtwin {n_l}, peer {n_p}"
    v = float(np.nanmax(np.abs(rec.voltage_V - np.asarray(s["voltage_V"], float))))
    i_l, i_p = rec.current_A, np.asarray(s["current_A"], float)
    di = float(np.nanmax(np.abs(i_l - i_p)))
    di_abs = float(np.nanmax(np.abs(np.abs(i_l) - np.abs(i_p))))
    t = float(np.nanmax(np.abs((rec.time_s - rec.time_s[0]) - (np.asarray(s["time_s"]) - s["time_s"][0]))))
    out = f"rows: {n_l} both; max |dV| {v:.2g} V, |dt| {t:.2g} s, |dI| {di:.3g} A"
    if di > 1e-9 and di_abs <= 1e-9:
        flipped = int(np.sum(np.sign(i_l) != np.sign(i_p)))
        out += f" (|I| equal: {flipped} rows signed differently: labtwin signed the file's unsigned current)"
    return out


def _fmt(x: float | None, digits: int = 6) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else (f"{x:.2%}" if x >= 1e-4 else f"{x:.1e}")


def run_peers(peers: list[str], files: list[str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name in peers:
        py = os.environ.get(f"LABTWIN_PEER_{name.upper()}_PYTHON", PEER_PYTHON[name])
        if not Path(py).exists():
            out[name] = [
                {"peer": name, "file": f, "ok": False, "error": f"not installed ({py} missing)"} for f in files
            ]
            continue
        env = {**os.environ, **PEER_ENV.get(name, {})}
        t0 = time.perf_counter()
        proc = subprocess.run(
            [py, str(Path(__file__).resolve()), "--peer", name, *files],
            capture_output=True,
            text=True,
            env=env,
            cwd=PEER_CWD,  # cellpy writes cellpy_*.log files where it runs: not into the repository
            timeout=PEER_TIMEOUT_S,
        )
        try:
            out[name] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            tail = " ".join(proc.stderr.split())[-400:]
            out[name] = [{"peer": name, "file": f, "ok": False, "error": f"peer process failed: {tail}"} for f in files]
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", help="(internal) run as this peer on FILES and print JSON")
    ap.add_argument("files_pos", nargs="*", metavar="FILE")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to run")
    ap.add_argument("--files", nargs="*", help="files relative to the repository (default: every real file)")
    ap.add_argument("--json", type=Path, help="also write the raw results as JSON here")
    ap.add_argument("--write-doc", type=Path, help="replace the table between the markers in this markdown file")
    args = ap.parse_args()
    if args.peer:
        run_peer(args.peer, args.files_pos)
        return

    files = args.files or REAL_FILES
    peers = [p for p in args.peers.split(",") if p]
    labs: dict[str, dict] = {}
    for f in files:
        try:
            labs[f] = labtwin_cycles(ROOT / f)
        except Exception as exc:
            labs[f] = {"error": f"{type(exc).__name__}: {exc}", "cycles": [], "format": "?"}
    results = run_peers(peers, files)
    for name in peers:
        print(f"# {name}: {PEER_RULES[name]}")

    table: list[dict] = []
    for f in files:
        lab = labs[f]
        print(f"\n=== {f}  [labtwin: {lab['format']}, {len(_nonempty(lab['cycles']))} cycles]")
        if "error" in lab:
            print(f"  labtwin could not read it: {lab['error']}")
        for name in peers:
            peer = next(r for r in results[name] if r["file"] == f)
            version = peer.get("version") or ""
            if not peer["ok"]:
                print(f"  -- {name} {version}: does not read it: {peer['error']}")
                table.append(
                    {"file": f, "format": lab["format"], "peer": f"{name} {version}".strip(), "error": peer["error"]}
                )
                continue
            cmp = compare(lab, peer)
            print(f"  -- {name} {version}: {len(cmp['pairs'])} cycles compared")
            print(
                f"     {'lab':>4} {'peer':>4} | {'lab charge':>12} {'peer charge':>12} {'diff':>8} | {'lab disch':>12} "
                f"{'peer disch':>12} {'diff':>8} | {'lab CE':>8} {'peer CE':>8} {'diff':>8} {'same-formula':>12} | "
                f"{'both ways':>8}"
            )
            for lr, pr, dc, dd, de, dl, dt in cmp["pairs"]:
                print(
                    f"     {lr['cycle']:>4} {pr['cycle']:>4} | {_fmt(lr['charge_Ah']):>12} {_fmt(pr['charge_Ah']):>12} "
                    f"{_pct(dc):>8} | {_fmt(lr['discharge_Ah']):>12} {_fmt(pr['discharge_Ah']):>12} {_pct(dd):>8} | "
                    f"{_fmt(lr['ce'], 5):>8} {_fmt(pr['ce'], 5):>8} {_pct(de):>8} {_pct(dl):>12} | {_pct(dt):>8}"
                )
            unpaired_lab = len(_nonempty(lab["cycles"])) - len(cmp["pairs"])
            print(
                f"     largest difference: capacity {_pct(cmp['largest_capacity'])} (charge moved both ways "
                f"{_pct(cmp['largest_throughput'])}), CE {_pct(cmp['largest_ce'])} "
                f"(with labtwin's CE formula on the peer's capacities: {_pct(cmp['largest_ce_same_formula'])}); "
                f"file totals {_pct(cmp['total_diff'])}; unpaired cycles: labtwin {unpaired_lab}, "
                f"peer {cmp['peer_cycles'] - len(cmp['pairs'])}"
            )
            rows = compare_samples(lab, peer)
            if rows:
                cmp["notes"].append(rows)
            for n in cmp["notes"]:
                print(f"     - {n}")
            table.append(
                {
                    "file": f,
                    "format": lab["format"],
                    "peer": f"{name} {version}".strip(),
                    "compared": len(cmp["pairs"]),
                    "lab_cycles": len(_nonempty(lab["cycles"])),
                    "peer_cycles": cmp["peer_cycles"],
                    "capacity": cmp["largest_capacity"],
                    "throughput": cmp["largest_throughput"],
                    "ce": cmp["largest_ce"],
                    "ce_same": cmp["largest_ce_same_formula"],
                    "total": cmp["total_diff"],
                    "notes": cmp["notes"],
                }
            )
    md = markdown_table(table)
    print("\n" + md)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"labtwin": {f: {k: v for k, v in labs[f].items() if k != "rec"} for f in files}, "peers": results},
                indent=1,
                default=str,
            )
        )
    if args.write_doc:
        text = args.write_doc.read_text()
        start, end = "<!-- peer-table:start -->", "<!-- peer-table:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        args.write_doc.write_text(f"{head}{start}\n{md}\n{end}{tail}")


def markdown_table(table: list[dict]) -> str:
    """Two tables: every comparison made, then what each peer did not read (its own words, shortened)."""
    lines = [
        "| file | format (labtwin) | peer | cycles compared (labtwin / peer) | largest difference: charge, "
        "discharge; both ways | CE; CE with labtwin's formula | what the bench found |",
        "|---|---|---|---|---|---|---|",
    ]
    refused: dict[str, list[str]] = {}
    for t in table:
        name = Path(t["file"]).name
        if "error" in t:
            refused.setdefault(t["peer"], []).append(f"`{name}`: {t['error'].replace('|', '/')[:160]}")
            continue
        notes = "; ".join(n.replace("|", "/") for n in t["notes"])
        lines.append(
            f"| `{name}` | {t['format']} | {t['peer']} | {t['compared']} ({t['lab_cycles']} / {t['peer_cycles']}) | "
            f"{_pct(t['capacity'])}; {_pct(t['throughput'])} | {_pct(t['ce'])}; {_pct(t['ce_same'])} | {notes} |"
        )
    lines += ["", "| peer | files it did not read, and its error |", "|---|---|"]
    for peer, items in refused.items():
        lines.append(f"| {peer} | {'<br>'.join(items)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
