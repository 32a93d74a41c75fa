"""The false-alarm matrix (issue 16): every library protocol on every library cell it suits, dry-run with the twin on.

A protocol suits a cell when its ``metadata.chemistry`` is the cell's chemistry; a protocol without one (the EIS
check-up) suits every cell whose voltage window holds the voltages it sets. Each combination is dry-run through
the real path (labtwin.cli.dryrun.run_dryrun: Prefect flow, embedded MQTT broker, agent, recorder, twin), one at a
time, in a worker process of its own that is killed when the combination passes ``--timeout-s`` of wall time.

What is expected of each combination:

- a healthy cell raises nothing;
- a cell with a seeded fault raises that fault's kind where the protocol can show it (``FAULTS``: which
  protocols reveal which fault, and why), and nothing that is not a consequence of the fault; where the
  protocol cannot show it (a spectrum alone cannot show a first-cycle CE) the cell is held to the healthy rule;
- the faults the library cells do not carry (a soft short, a contact going bad) are seeded into a healthy cell's
  definition (``parameters.faults``, labtwin.physics.cell.Fault) and dry-run against a twin of the healthy
  definition (run_dryrun's ``twin_model``), as a real cell that develops the fault is followed by its model.

One line per combination: protocol, cell, expected, anomalies by kind, wall s, cell h and the verdict (ok,
FALSE ALARM, MISSED, timeout, error). Results are appended to ``--results`` (JSON lines, with every anomaly's
message) as they come, so a long matrix can be resumed (``--resume``). Exit 1 when a healthy combination raised
anything or a seeded fault was missed; timeouts and errors are listed and exit 1 only with ``--strict``.

    python bench/false_alarms.py                          # the whole matrix, fastest protocols first
    python bench/false_alarms.py --list                   # the combinations and what each expects, no run
    python bench/false_alarms.py --protocol 'seed00*' --cell 'lco-*' --timeout-s 120
    python bench/false_alarms.py --resume --results labtwin-data/false_alarms.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULT_TAG = "FALSE-ALARM-RESULT "

# Fastest first (cell hours and the cost of the cell's model per sample, measured on this machine): the short
# runs give a table early; the 50-cycle and loop-until-80 % runs come last.
PROTOCOL_ORDER = [
    "eis-checkup",
    "seed004-formation",
    "seed003-gitt",
    "lco_formation",
    "pybamm-style-cycling",
    "demo-lto-0.1C",
    "seed000-lto-0.1C",
    "seed001-cv-multirate",
    "seed002-li-plating",
    "seed000-lto-0.025C",
    "lto_formation",
    "seed003-cycling-eis",
    "cycle-to-80-percent",
]


@dataclass(frozen=True)
class SeededFault:
    """A fault a library cell carries by design, the anomaly kinds that are it, and the protocols that show it."""

    label: str
    kinds: frozenset[str]  # at least one of these must be raised where the protocol reveals the fault
    revealed_by: dict[str, str]  # protocol -> why it can show the fault
    consequences: frozenset[str] = frozenset()  # further kinds the fault itself causes (not false alarms)
    caught_by: dict[str, frozenset[str]] = field(default_factory=dict)  # protocol -> other kinds that catch it


FAULTS: dict[str, SeededFault] = {
    "lto-thin-film": SeededFault(
        "oscillating bare LTO",
        frozenset({"oscillation_onset"}),
        {
            "demo-lto-0.1C": "a 0.1C plateau: seed 000's 2.5 mV mosaic oscillation",
            "seed000-lto-0.1C": "two 0.1C cycles",
            "seed000-lto-0.025C": "a 0.025C cycle: shorter period in capacity",
            "lto_formation": "the model's bare film oscillates at 1C too: 0.9-1.5 mV, period 1.4 uAh",
        },
    ),
    "lco-lgps-ceramic": SeededFault(
        "ceramic impedance growth",
        frozenset({"impedance_growth"}),
        {
            "seed003-cycling-eis": "a spectrum every 10 cycles over 50: R_ct +65 %",
            "cycle-to-80-percent": "a spectrum every cycle until 80 % capacity",
        },
        # The interfaces that grow are what the cell's polarization is made of (0.18 -> 0.27 V over 50 cycles).
        frozenset({"polarization_growth"}),
    ),
    "lco-lgps-pristine": SeededFault(
        "pristine LCO first-cycle CE",
        frozenset({"low_first_cycle_ce"}),
        {
            p: "a first charge and discharge: CE ~22 % (seed 004)"
            for p in (
                "seed004-formation",
                "seed003-gitt",
                "lco_formation",
                "pybamm-style-cycling",
                "seed003-cycling-eis",
                "cycle-to-80-percent",
            )
        },
        # The same decomposition grows R_CI past 3000 ohm in the first charge (seed 004): later spectra see it grow
        # and the discharges that follow deliver less and less.
        frozenset({"impedance_growth", "capacity_fade", "polarization_growth"}),
    ),
    # Seed 003's bare cathode interface: R_CI 1500 ohm growing past 10 000 ohm within 50 cycles (sqrt law), so the
    # capacity a 0.2C discharge reaches before its cut-off falls by a quarter in three cycles.
    "lco-lgps-bare": SeededFault(
        "bare LCO interface growth",
        frozenset({"impedance_growth", "polarization_growth", "capacity_fade"}),
        {
            "lco_formation": "three 0.2C cycles: 75 % of the first cycle's capacity by the third",
            "pybamm-style-cycling": "the same three cycles",
            "seed003-cycling-eis": "R_CI past 10 000 ohm over 50 cycles (seed 003), a spectrum every 10",
            "cycle-to-80-percent": "a spectrum every cycle, cycled until 80 % capacity",
        },
        # The first 0.2C charge already grows R_CI past 2 kOhm: the discharge meets its cut-off early (CE 57 %
        # without a CV hold); and a fade that accelerates as the interface grows is a knee.
        frozenset({"knee_onset", "low_first_cycle_ce"}),
        # Its first cycle's CE (19 % at C/2) ends cycle-to-80-percent by its own stop_when (CE below 90 %).
        {"cycle-to-80-percent": frozenset({"low_first_cycle_ce"})},
    ),
}


# What a protocol is written to reach is not an anomaly of the cell that reaches it: cycle-to-80-percent cycles
# until the discharge capacity falls below 80 % of the first cycle's, which is the capacity-fade detector's
# end-of-life line, so its last cycle raises capacity_fade on a healthy cell that aged as its seed says.
PROTOCOL_ENDS: dict[str, frozenset[str]] = {"cycle-to-80-percent": frozenset({"capacity_fade"})}


@dataclass(frozen=True)
class InjectedFault:
    """A fault seeded into a healthy library cell's definition, dry-run against the healthy twin."""

    name: str  # the faulty cell's name
    base: str  # the healthy library cell it is made from (and the twin's model)
    label: str
    fault: dict  # labtwin.physics.cell.Fault fields
    protocols: dict[str, frozenset[str]]  # protocol -> the kinds that catch the fault there (one is needed)
    consequences: frozenset[str] = frozenset()
    why: str = ""


INJECTED: list[InjectedFault] = [
    InjectedFault(
        "glassy-ceramic-soft-short",
        "lco-lgps-glassy-ceramic",
        "soft short",
        # A 200 kOhm leakage path from 15 min into the run (after lco_formation's first rest: a short at the as-made
        # 1.88 V would trip the 1.9 V safety limit there): ~18 uA at 3.6 V, C/57 of the 1.02 mAh cell.
        {"kind": "soft_short", "at_time_s": 900.0, "resistance_ohm": 2.0e5},
        {
            # The hour's rest after the charge: the residual falls 5.9 mV over its second half, a 15 uA leak.
            "seed003-gitt": frozenset({"soft_short"}),
            # Its 10-minute rests are too short to measure this leak (1.2 mV over the second half of the rest
            # after charge, under the 2 mV floor); the cell departs from its twin instead: it empties 190 uAh
            # early (-790 mV at the end of each discharge), and its CE stays at 82-84 %.
            "lco_formation": frozenset({"soft_short", "twin_residual"}),
        },
        # A leak takes charge the discharge never returns (CE falls) and drags the cell below its model.
        frozenset({"low_first_cycle_ce", "ce_change", "twin_residual", "voltage_drop"}),
        "the cell loses charge at open circuit: the rests after a charge",
    ),
    InjectedFault(
        "glassy-ceramic-contact-loss",
        "lco-lgps-glassy-ceramic",
        "contact loss",
        # 300 ohm more in series 2 h into the run (mid first charge at 0.2C: +61 mV at 0.2 mA).
        {"kind": "contact_loss", "at_time_s": 7200.0, "resistance_ohm": 300.0},
        {"lco_formation": frozenset({"twin_residual"}), "seed003-gitt": frozenset({"twin_residual"})},
        frozenset({"voltage_drop", "polarization_growth"}),
        "the measured voltage departs from the model under current",
    ),
]


@dataclass
class Combination:
    protocol: str
    cell: str  # library name, or the injected fault's name
    expected: str  # "healthy" or the fault's label
    required: frozenset[str] = frozenset()
    allowed: frozenset[str] = frozenset()
    cell_path: str | None = None  # the faulty definition's file, for injected faults
    twin_model: str | None = None
    notes: list[str] = field(default_factory=list)
    skip: str | None = None  # why this combination is not run (the dry-run would refuse it)

    @property
    def key(self) -> str:
        return f"{self.protocol}|{self.cell}"


def _step_voltages(items) -> list[float]:
    """Every voltage a protocol's steps set or end on (its window must fit the cell's)."""
    out: list[float] = []
    for item in items:
        steps = getattr(item, "steps", None)
        if steps is not None:
            out += _step_voltages(steps)
            continue
        for step in item.model_dump().values():
            if not isinstance(step, dict):
                continue
            for key in ("voltage_V", "start_V", "vertex_1_V", "vertex_2_V", "until_voltage_V"):
                if isinstance(step.get(key), (int, float)):
                    out.append(float(step[key]))
            until = step.get("until") or {}
            if isinstance(until, dict) and isinstance(until.get("voltage_V"), (int, float)):
                out.append(float(until["voltage_V"]))
    return out


def suits(protocol, cell) -> bool:
    chemistry = protocol.metadata.chemistry
    if chemistry:
        return chemistry == cell.chemistry
    lo, hi = cell.voltage_window_V
    return all(lo <= v <= hi for v in _step_voltages(protocol.method))


def refused(protocol, cell) -> str | None:
    """Why a dry-run would refuse the protocol on this cell, if it would: its safety window reaches beyond
    the simulated channel's limits (the cell's window plus 5 % of its span each side, labtwin.cli.dryrun)."""
    lo, hi = cell.voltage_window_V
    margin = 0.05 * (hi - lo)
    vmin, vmax = protocol.safety.voltage_min_V, protocol.safety.voltage_max_V
    if vmin is not None and vmin < lo - margin - 1e-9:
        return f"safety voltage_min_V {vmin:g} below the channel's {lo - margin:.3g} (cell window {lo:g}-{hi:g} V)"
    if vmax is not None and vmax > hi + margin + 1e-9:
        return f"safety voltage_max_V {vmax:g} above the channel's {hi + margin:.3g} (cell window {lo:g}-{hi:g} V)"
    return None


def matrix() -> list[Combination]:
    from labtwin.physics.library import available_cells, load_cell
    from labtwin.protocols.model import LIBRARY, load_protocol

    names = sorted(p.stem for p in LIBRARY.glob("*.yaml"))
    ordered = [p for p in PROTOCOL_ORDER if p in names] + [p for p in names if p not in PROTOCOL_ORDER]
    cells = {name: load_cell(name) for name in available_cells()}
    out: list[Combination] = []
    for p in ordered:
        protocol = load_protocol(p)
        for name, cell in cells.items():
            if not suits(protocol, cell):
                continue
            seeded = FAULTS.get(name)
            why_not = refused(protocol, cell)
            if why_not is not None:
                out.append(Combination(p, name, "does not suit", skip=why_not))
            elif seeded is not None and p in seeded.revealed_by:
                kinds = seeded.kinds | seeded.caught_by.get(p, frozenset())
                allowed = kinds | seeded.consequences | PROTOCOL_ENDS.get(p, frozenset())
                out.append(Combination(p, name, seeded.label, kinds, allowed))
            else:
                note = [f"{seeded.label}: not shown by this protocol"] if seeded else []
                out.append(Combination(p, name, "healthy", allowed=PROTOCOL_ENDS.get(p, frozenset()), notes=note))
        for inj in INJECTED:
            if p in inj.protocols:
                kinds = inj.protocols[p]
                out.append(Combination(p, inj.name, inj.label, kinds, kinds | inj.consequences, twin_model=inj.base))
    return out


def write_fault_cell(inj: InjectedFault, folder: Path) -> Path:
    """The healthy cell's file with the fault added (and its source, which every cell parameter needs)."""
    import yaml

    from labtwin.physics.library import CELL_DIR

    raw = yaml.safe_load((CELL_DIR / f"{inj.base}.yaml").read_text())
    raw["name"] = inj.name
    raw["aliases"] = []
    raw["description"] = f"{raw['description']}, with a seeded {inj.label}"
    raw["parameters"]["faults"] = [inj.fault]
    raw["sources"]["faults"] = f"seeded by bench/false_alarms.py: {inj.why}"
    path = folder / f"{inj.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def verdict(c: Combination, kinds: Counter) -> str:
    raised = set(kinds)
    if c.required and not (raised & c.required):
        return "MISSED"
    if raised - c.allowed:
        return "FALSE ALARM"
    return "ok"


# ---------------------------------------------------------------------------------------------- worker
async def _worker() -> None:
    """Runs the jobs it reads on stdin one after the other, in one Prefect API and event loop."""
    import logging

    logging.disable(logging.WARNING)
    from labtwin.cli.dryrun import run_dryrun

    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        job = json.loads(line)
        started = time.monotonic()
        try:
            summary, anomalies = await run_dryrun(job["protocol"], job["sim"], None, twin_model=job.get("twin_model"))
            result = {
                "exit_status": summary.exit_status,
                "reason": summary.reason,
                "cell_time_s": summary.cell_time_s,
                "n_samples": summary.n_samples,
                "cycles": len(summary.cycles),
                "coulombic_efficiency": [c.coulombic_efficiency for c in summary.cycles],
                "anomalies": [
                    {
                        "kind": a.kind,
                        "message": a.message,
                        "time_s": a.time_s,
                        "step": a.step,
                        "cycle": a.cycle,
                        "figures": a.figures,
                    }
                    for a in anomalies
                ],
            }
        except Exception as exc:  # a combination that cannot run is a result too (the table says why)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["wall_s"] = time.monotonic() - started
        print(RESULT_TAG + json.dumps(result), flush=True)


class Worker:
    """A child process running _worker; killed (its whole process group) when a job overruns."""

    def __init__(self) -> None:
        # A folder of its own: the agent's spool (./labtwin-data/spool) must not hand one combination's run to
        # the next one's recorder.
        self.folder = tempfile.TemporaryDirectory(prefix="labtwin-false-alarms-worker-")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            cwd=self.folder.name,  # the spool and any store stay out of the repository
        )

    def run(self, job: dict, timeout_s: float) -> dict | None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(timeout=left):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    return {"error": f"worker exited ({self.proc.wait()})"}
                if line.startswith(RESULT_TAG):
                    return json.loads(line[len(RESULT_TAG) :])
            return None
        finally:
            selector.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # this worker's own session: its threads and children
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.folder.cleanup()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.folder.cleanup()


# ---------------------------------------------------------------------------------------------- main
def _kinds_text(kinds: Counter) -> str:
    return ",".join(f"{k}:{n}" for k, n in sorted(kinds.items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", action="append", help="only these protocols (glob, repeatable)")
    parser.add_argument("--cell", action="append", help="only these cells (glob, repeatable)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="wall-time bound of one combination")
    parser.add_argument("--results", type=Path, default=REPO / "labtwin-data" / "false_alarms.jsonl")
    parser.add_argument("--resume", action="store_true", help="skip combinations --results already has")
    parser.add_argument("--list", action="store_true", help="print the combinations and what each expects")
    parser.add_argument("--strict", action="store_true", help="a timeout or an error fails the matrix too")
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker())
        return 0

    combos = [
        c
        for c in matrix()
        if (not args.protocol or any(fnmatch.fnmatch(c.protocol, g) for g in args.protocol))
        and (not args.cell or any(fnmatch.fnmatch(c.cell, g) for g in args.cell))
    ]
    if args.list:
        for c in combos:
            extra = f"  must raise one of {sorted(c.required)}" if c.required else ""
            extra += f"  (not run: {c.skip})" if c.skip else ""
            print(f"{c.protocol:22} {c.cell:30} {c.expected}{extra} {'; '.join(c.notes)}")
        print(f"{len(combos)} combinations")
        return 0

    done: dict[str, dict] = {}
    if args.resume and args.results.exists():
        for line in args.results.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    args.results.parent.mkdir(parents=True, exist_ok=True)
    fault_dir = Path(tempfile.mkdtemp(prefix="labtwin-false-alarms-"))
    fault_paths = {inj.name: write_fault_cell(inj, fault_dir) for inj in INJECTED}

    header = (
        f"{'protocol':22} {'cell':30} {'expected':28} {'anomalies':34} {'wall_s':>7} {'cell_h':>7} {'run':8} verdict"
    )
    print(header, flush=True)
    failures, incomplete = 0, 0
    worker: Worker | None = None
    try:
        for c in combos:
            if c.skip is not None:
                print(
                    f"{c.protocol:22} {c.cell:30} {'does not suit':28} {'(not run)':34} {'-':>7} {'-':>7} {'-':8} {c.skip}"
                )
                continue
            if c.key in done:
                row = done[c.key]
            else:
                worker = worker or Worker()
                job = {"protocol": c.protocol, "sim": str(fault_paths.get(c.cell, c.cell)), "twin_model": c.twin_model}
                started = time.monotonic()
                result = worker.run(job, args.timeout_s)
                if result is None:
                    worker.kill()
                    worker = None
                    result = {"timeout": True, "wall_s": time.monotonic() - started}
                elif result.get("error"):
                    # A run that raised may leave its agent busy or its cell computing: the next combination
                    # gets a fresh worker (a run left behind made the next one "ChannelBusy").
                    worker.kill()
                    worker = None
                row = {"key": c.key, "protocol": c.protocol, "cell": c.cell, "expected": c.expected, **result}
                with args.results.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            kinds = Counter(a["kind"] for a in row.get("anomalies", []))
            if row.get("timeout"):
                outcome = f"timeout (> {args.timeout_s:.0f} s)"
                incomplete += 1
            elif row.get("error"):
                outcome = f"error: {row['error'][:80]}"
                incomplete += 1
            else:
                outcome = verdict(c, kinds)
                failures += outcome != "ok"
            cell_h = f"{row['cell_time_s'] / 3600:.1f}" if "cell_time_s" in row else "-"
            print(
                f"{c.protocol:22} {c.cell:30} {c.expected:28} {_kinds_text(kinds):34} "
                f"{row.get('wall_s', 0.0):7.1f} {cell_h:>7} {row.get('exit_status', '-'):8} {outcome}",
                flush=True,
            )
    finally:
        if worker is not None:
            worker.close()
    print(f"{len(combos)} combinations: {failures} failed, {incomplete} timed out or errored")
    return 1 if failures or (args.strict and incomplete) else 0


if __name__ == "__main__":
    sys.exit(main())
