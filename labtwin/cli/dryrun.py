"""`labtwin dryrun`: the same flow, agent and safety checks as a real run, on a simulated cell at max speed.

Nothing here is a shortcut around the real path: an embedded broker, an
agent on a simulated channel and the Prefect flow run exactly as they would
for a bench instrument, so a dry-run finds what a real run would hit.
"""

from __future__ import annotations

import json
from pathlib import Path

from labtwin.cli.wiring import LocalLab, default_lab
from labtwin.export import export_samples
from labtwin.lab import ChannelConfig, LabConfig
from labtwin.summary import RunSummary
from simulators.cells import load_cell


async def run_dryrun(
    protocol: str, sim: str, out: Path | None, channel: str | None = None, lab_file: Path | None = None
) -> RunSummary:
    from protocols.flows import run_protocol, start_prefect_api

    cell = load_cell(sim)
    if channel is not None:
        limits = default_lab(lab_file).channel(channel).limits
    else:
        # A simulated channel's hard limits: the cell's operating window plus 5 % of its span each side,
        # so a protocol's own safety limits (just outside the window) are the ones that act.
        lo, hi = cell.voltage_window_V
        margin = 0.05 * (hi - lo)
        from labtwin.models import Limits

        limits = Limits(voltage_min_V=lo - margin, voltage_max_V=hi + margin)
    config = LabConfig(
        lab="dryrun",
        channels={"sim": ChannelConfig(driver="simulated", cell=sim, cell_id=f"dryrun-{cell.name}", speed="max", seed=0, limits=limits)},
    )
    store_url = ":memory:" if out is None else str(out / "dryrun.db")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        Path(store_url).unlink(missing_ok=True)
    await start_prefect_api()
    async with LocalLab(config, ["sim"], None, store_url, None) as local:
        summary = await run_protocol(protocol, "sim", local.url, lab=config.lab)
        await local.wait_stored(summary.run_id)
        if out is not None:
            export_samples(local.store.samples(summary.run_id), out / "samples.csv", "csv")
            impedance = local.store.impedance(summary.run_id)
            if len(impedance["frequency_Hz"]):
                columns = {k: impedance[k] for k in ("frequency_Hz", "z_real_ohm", "z_imag_ohm", "step", "cycle")}
                export_samples(columns, out / "eis.csv", "csv")
            (out / "summary.json").write_text(json.dumps(summary.model_dump(), indent=2, default=str))
    return summary
