"""A schema-valid batch no instrument could have measured is refused; samples no run document names are shown.

Found by a newcomer's trial on an unsigned lab: a SampleBatch at 1e308 V was stored as a reading, and a batch
of a run no RunStart named was stored and listed nowhere (`labtwin runs` did not show it)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from typer.testing import CliRunner

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.cli import app
from labtwin.cli.wiring import LocalLab
from labtwin.data.store import Store
from labtwin.documents import RunStart, SampleBatch
from labtwin.documents.codec import MalformedPayload, decode, encode
from tests.helpers import sim_lab


def _batch(run_id: str, seq: int = 0, **columns: list) -> SampleBatch:
    n = 3
    values = {
        "time_s": [float(k) for k in range(n)],
        "voltage_V": [1.5] * n,
        "current_A": [1e-4] * n,
        "capacity_Ah": [0.0] * n,
        "temperature_C": [25.0] * n,
        "step": [0] * n,
        "cycle": [0] * n,
        "frequency_Hz": [1e3, 1e2, 1e1],
        "z_real_ohm": [1.2, 1.5, 2.0],
        "z_imag_ohm": [-0.1, -0.3, -0.2],
    }
    values.update(columns)
    return SampleBatch.model_construct(run_id=run_id, channel="ch", seq=seq, kind="samples", **values)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("voltage_V", 1e308),
        ("current_A", -2e5),
        ("temperature_C", -300.0),
        ("capacity_Ah", 1e9),
        ("time_s", 1e12),
        ("z_real_ohm", 1e308),
        ("frequency_Hz", -1.0),
    ],
)
def test_a_reading_no_instrument_measures_refuses_the_batch_naming_the_column(column: str, value: float) -> None:
    good = _batch("r")
    topic = busmod.topic("l", "ch", "data")
    assert decode(topic, encode(good)) == good
    bad = _batch("r", **{column: [value] + list(getattr(good, column))[1:]})
    with pytest.raises(MalformedPayload) as refused:
        decode(topic, bad.model_dump_json().encode())
    assert column in str(refused.value)


def test_samples_of_a_run_no_run_document_names_are_listed(tmp_path, monkeypatch) -> None:
    store = Store.open(tmp_path / "s.db")
    store.write([RunStart(run_id="real", lab="l", channel="ch", cell_id="c", protocol="p", n_steps=1), _batch("real")])
    store.write([_batch("invented", seq=5)])
    rows = {r.run_id: r for r in store.runs()}
    store.close()
    assert rows["real"].announced and rows["real"].stored_samples == 3
    assert not rows["invented"].announced and rows["invented"].stored_samples == 3
    import labtwin.cli

    monkeypatch.setattr(labtwin.cli.console, "width", 220)
    shown = CliRunner().invoke(app, ["runs", "--store", str(tmp_path / "s.db")])
    assert shown.exit_code == 0, shown.output
    (line,) = [line for line in shown.output.splitlines() if "invented" in line]
    assert "no RunStart" in line
    assert "check them before trusting them" in shown.output


async def test_the_recorder_skips_an_implausible_batch_and_says_why(broker_url, unique_lab, tmp_path, caplog):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    with caplog.at_level(logging.WARNING, logger="labtwin.bus.client"):
        async with LocalLab(lab, [], broker_url, str(tmp_path / "s.db")) as local:
            async with Bus(local.url) as pub:
                topic = busmod.topic(unique_lab, "ch", "data")
                await pub.publish(topic, _batch("r", voltage_V=[1e308, 1.5, 1.5]).model_dump_json().encode())
                await pub.publish(topic, _batch("r", seq=1))
                await pub.flush()
            for _ in range(100):
                if local.recorder.stats.batches >= 1:
                    break
                await asyncio.sleep(0.05)
            assert local.store.sample_count("r") == 3  # the plausible one only
    skipped = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert skipped and "voltage_V" in skipped[0] and "10000" in skipped[0], skipped
