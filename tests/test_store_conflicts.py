"""A batch under a stored (run_id, seq) with other samples is a recorded conflict, never a silent drop (issue 13).

The finding: a forged SampleBatch with a future seq was stored, and the agent's real batch with that number was
then dropped as a duplicate. Now the store tells a re-delivery (same digest) from another batch (a conflict), keeps
the stored one and the other one beside it, and says so: the recorder warns, ``labtwin runs`` counts them.
On SQLite and PostgreSQL; a store made at schema 2 gets there with ``labtwin db upgrade``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from typer.testing import CliRunner

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.cli import app
from labtwin.cli.wiring import LocalLab
from labtwin.data import migrate
from labtwin.data.digest import batch_digest, samples_digest
from labtwin.data.engine import make_engine, parse_url
from labtwin.data.store import Store
from labtwin.documents import SampleBatch
from tests.helpers import sim_lab


def _batch(run_id: str = "r", seq: int = 0, n: int = 4, volts: float = 3.7, **update: Any) -> SampleBatch:
    batch = SampleBatch(
        run_id=run_id,
        channel="ch1",
        seq=seq,
        time_s=[10.0 * seq + k for k in range(n)],
        voltage_V=[volts] * n,
        current_A=[-0.5] * n,
        capacity_Ah=[-1e-4 * k for k in range(n)],
        temperature_C=[25.0] * n,
        step=[1] * n,
        cycle=[1] * n,
    )
    return batch.model_copy(update=update) if update else batch


def _forged(run_id: str = "r", seq: int = 0, n: int = 4) -> SampleBatch:
    """What the finding's forger sent: 9.99 V, 1 A, 99 degC."""
    return _batch(run_id, seq, n, volts=9.99, current_A=[1.0] * n, temperature_C=[99.0] * n)


def _eis(seq: int = 0) -> SampleBatch:
    """Impedance points, a sample without temperature, and the values SQLite changes on the way in (-0.0)."""
    return _batch(
        seq=seq,
        n=3,
        current_A=[-0.0, 0.0, 1e-3],
        temperature_C=[None, 25.0, 25.1],
        frequency_Hz=[1e3, 1e2, 1e1],
        z_real_ohm=[0.5, 0.6, 0.9],
        z_imag_ohm=[-0.1, -0.3, -0.2],
    )


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(url) -> Iterator[Store]:
    s = Store.open(url)
    yield s
    s.close()


def _sql(store: Store, statement: str, **params: Any) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn, conn.begin():
        result = conn.execute(text(statement), params)
        return [tuple(r) for r in result] if result.returns_rows else []


# ---------------------------------------------------------------- the digest


def test_the_digest_changes_with_every_stored_value_and_not_with_how_the_json_spelled_it():
    base = _eis()
    digest = batch_digest(base)
    assert len(digest) == 64 and int(digest, 16) >= 0
    changed = {
        "time_s": [0.0, 1.0, 2.5],
        "voltage_V": [3.7, 3.7, 3.71],
        "current_A": [-0.0, 0.0, 2e-3],
        "capacity_Ah": [0.0, -1e-4, -3e-4],
        "temperature_C": [25.0, 25.0, 25.1],  # a None that became a number
        "step": [1, 1, 2],
        "cycle": [1, 1, 2],
        "frequency_Hz": [1e3, 1e2, 2e1],
        "z_real_ohm": [0.5, 0.6, 0.8],
        "z_imag_ohm": None,  # stored as NULLs
    }
    digests = {name: batch_digest(base.model_copy(update={name: value})) for name, value in changed.items()}
    digests["no impedance"] = batch_digest(
        _batch(seq=0, n=3, current_A=[-0.0, 0.0, 1e-3], temperature_C=[None, 25.0, 25.1])
    )
    digests["one sample fewer"] = batch_digest(_batch(seq=0, n=2))
    assert len(set(digests.values()) | {digest}) == len(digests) + 1, "each change makes another digest"

    # The same numbers however the JSON wrote them (integers for floats, key order, spacing), and the values
    # the databases fold alike (-0.0 and 0.0; NaN and None): one digest.
    doc = json.loads(base.model_dump_json())
    doc["time_s"] = [0, 1, 2]
    respelled = SampleBatch.model_validate_json(json.dumps(dict(reversed(list(doc.items()))), indent=2))
    assert batch_digest(respelled) == digest
    assert batch_digest(base.model_copy(update={"current_A": [0.0, -0.0, 1e-3]})) == digest
    assert batch_digest(base.model_copy(update={"temperature_C": [float("nan"), 25.0, 25.1]})) == digest
    # the channel is not stored with the samples, so it is not in their digest
    assert batch_digest(base.model_copy(update={"channel": "ch9"})) == digest


def test_the_digest_of_a_batch_is_the_digest_of_its_rows_as_stored(store):
    """What the store computes for batches stored before schema 3: from the rows, it matches the batch's own."""
    store.write([_eis(seq=0), _batch(seq=1)])
    for seq, batch in ((0, _eis(seq=0)), (1, _batch(seq=1))):
        (stored,) = _sql(store, "SELECT digest FROM batches WHERE run_id = 'r' AND seq = :seq", seq=seq)
        assert stored[0] == batch_digest(batch)
        rows = _sql(
            store,
            "SELECT time_s, voltage_v, current_a, capacity_ah, temperature_c, step, cycle FROM samples "
            "WHERE run_id = 'r' AND seq = :seq ORDER BY i",
            seq=seq,
        )
        names = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")
        points = _sql(
            store,
            "SELECT frequency_hz, z_real_ohm, z_imag_ohm FROM impedance WHERE run_id = 'r' AND seq = :seq ORDER BY i",
            seq=seq,
        )
        z = tuple([p[k] for p in points] for k in range(3)) if points else None
        assert samples_digest({name: [r[k] for r in rows] for k, name in enumerate(names)}, z) == stored[0]


# ---------------------------------------------------------------- duplicates and conflicts


def test_a_re_delivery_is_a_duplicate_and_a_different_batch_is_a_recorded_conflict(store):
    real = _batch(seq=3)
    first = store.write([real])
    again = store.write([real])
    assert (first.batches, again.batches, again.duplicate_batches, again.conflicts) == (1, 0, 1, 0)
    assert store.conflicts() == []

    forged = _forged(seq=3)
    counts = store.write([forged])
    assert (counts.batches, counts.duplicate_batches, counts.conflicts, counts.conflicting) == (0, 0, 1, [("r", 3)])
    # the stored batch stays, samples and all
    assert list(store.samples("r")["voltage_V"]) == [3.7] * 4 and store.seqs("r") == [3]
    (conflict,) = store.conflicts()
    assert (conflict.run_id, conflict.seq, conflict.n) == ("r", 3, 4)
    assert (conflict.stored_digest, conflict.incoming_digest) == (batch_digest(real), batch_digest(forged))
    assert conflict.batch == forged  # the incoming document whole
    assert conflict.received_at.endswith("+00:00")

    # the same forgery delivered again is that conflict again, recorded once; another one is another conflict
    redelivered = store.write([forged])
    assert (redelivered.conflicts, redelivered.duplicate_batches) == (0, 1)
    other = _forged(seq=3).model_copy(update={"voltage_V": [0.1] * 4})
    assert store.write([other]).conflicts == 1
    assert [c.batch for c in store.conflicts(run_id="r")] == [forged, other]
    assert store.conflicts(run_id="another") == []
    assert store.sample_count("r") == 4


def test_the_finding_a_forged_future_batch_first_then_the_real_one_both_are_kept(store):
    """Issue 13: the forgery came first with a future seq. The store keeps it (it came first, with nothing
    to tell it from the truth: signing is what refuses it), but the real batch is no longer lost."""
    store.write([_batch(seq=0), _batch(seq=1)])
    store.write([_forged(seq=2)])
    counts = store.write([_batch(seq=2), _batch(seq=3)])
    assert (counts.batches, counts.conflicts, counts.conflicting) == (1, 1, [("r", 2)])
    (conflict,) = store.conflicts("r")
    assert conflict.batch == _batch(seq=2) and conflict.stored_digest == batch_digest(_forged(seq=2))


def test_a_conflict_inside_one_write_is_seen_before_the_samples_are_written(store):
    """The samples of a write go in at its end; the batch rows (and their digests) at once."""
    counts = store.write([_batch(seq=0), _forged(seq=0), _batch(seq=0), _batch(seq=1)])
    assert (counts.batches, counts.conflicts, counts.duplicate_batches, counts.samples) == (2, 1, 1, 8)
    assert list(store.samples("r")["voltage_V"]) == [3.7] * 8
    assert [c.batch for c in store.conflicts()] == [_forged(seq=0)]


def test_a_batch_stored_without_a_digest_is_compared_by_its_stored_rows(store):
    """A NULL digest (a batch stored before schema 3) is unknown: its digest is computed from its rows, so a
    re-delivery of it is a duplicate and a different batch a conflict."""
    store.write([_eis(seq=0), _batch(seq=1)])
    _sql(store, "UPDATE batches SET digest = NULL")
    again = store.write([_eis(seq=0), _batch(seq=1)])
    assert (again.duplicate_batches, again.conflicts) == (2, 0)
    counts = store.write([_eis(seq=0).model_copy(update={"z_imag_ohm": [-0.1, -0.3, -0.25]}), _forged(seq=1)])
    assert (counts.duplicate_batches, counts.conflicts) == (0, 2)
    assert [c.stored_digest for c in store.conflicts()] == [batch_digest(_eis(seq=0)), batch_digest(_batch(seq=1))]
    assert _sql(store, "SELECT digest FROM batches") == [(None,), (None,)]  # old rows are left as they were


def test_labtwin_runs_counts_a_runs_conflicts_in_the_table_and_in_json(url, monkeypatch):
    from labtwin.documents import RunStart

    store = Store.open(url)
    try:
        for run_id in ("clean", "forged"):
            store.write([RunStart(run_id=run_id, lab="l", channel="ch1", cell_id="c", protocol="p", n_steps=1)])
            store.write([_batch(run_id, seq=0), _batch(run_id, seq=1)])
        runner = CliRunner()
        plain = runner.invoke(app, ["runs", "--store", url])
        assert plain.exit_code == 0, plain.output
        assert "conflicts" not in plain.output  # no column while no run has one

        store.write([_forged("forged", seq=1)])
    finally:
        store.close()
    listed = runner.invoke(app, ["runs", "--store", url, "--json"])
    assert listed.exit_code == 0, listed.output
    assert {r["run_id"]: r["conflicts"] for r in json.loads(listed.output)} == {"clean": 0, "forged": 1}
    # Wide enough that no header wraps, whichever width the CLI's console took when it was imported
    # (rich fixes it then, from COLUMNS or the terminal).
    import labtwin.cli

    monkeypatch.setattr(labtwin.cli.console, "width", 220)
    table = runner.invoke(app, ["runs", "--store", url])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    (header,) = [line for line in lines if "channel" in line]
    (forged_line,) = [line for line in lines if "forged" in line and "│" in line]
    (clean_line,) = [line for line in lines if "clean" in line]
    column = header.index("conflicts")
    assert forged_line[column:].split("│")[0].strip() == "1"
    assert clean_line[column:].split("│")[0].strip() == ""
    assert any("batch_conflicts" in line for line in lines)


# ---------------------------------------------------------------- the recorder


async def test_the_recorder_counts_a_conflict_and_warns_naming_run_and_seq(broker_url, unique_lab, tmp_path, caplog):
    lab = sim_lab(unique_lab, {"ch1": "lto_bare_thinfilm"})
    with caplog.at_level(logging.WARNING, logger="labtwin.data.recorder"):
        async with LocalLab(lab, [], broker_url, str(tmp_path / "s.db")) as local:
            async with Bus(local.url) as pub:
                topic = busmod.topic(unique_lab, "ch1", "data")
                for batch in (_batch("rec", seq=0), _batch("rec", seq=0), _forged("rec", seq=0), _batch("rec", 1)):
                    await pub.publish(topic, batch)
                    await pub.flush()
                    await asyncio.sleep(0.05)  # one at a time, so the counts below do not depend on batching
            for _ in range(100):
                if local.recorder.stats.documents >= 4:
                    break
                await asyncio.sleep(0.05)
            stats = local.recorder.stats
            assert (stats.batches, stats.duplicate_batches, stats.conflicts) == (2, 1, 1)
            assert local.store.sample_count("rec") == 8
            assert [c.batch for c in local.store.conflicts("rec")] == [_forged("rec", seq=0)]
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "batch_conflicts" in r.message
    ]
    assert len(warnings) == 1 and "run rec: batch 0 " in warnings[0]


# ---------------------------------------------------------------- a store made at schema 2


def _make_schema_2_store(url: str) -> None:
    """A store as labtwin at schema 2 made it (the shipped revisions, up to 0002), with one batch in it."""
    engine = make_engine(parse_url(url))
    try:
        with engine.connect() as conn, conn.begin():
            command.upgrade(migrate.alembic_config(conn), "0002")
            conn.execute(text("INSERT INTO batches (run_id, seq, n) VALUES ('old', 0, 3)"))
            batch = _eis(seq=0)
            conn.execute(
                text(
                    "INSERT INTO samples (run_id, seq, i, time_s, voltage_v, current_a, capacity_ah, temperature_c, "
                    "step, cycle) VALUES ('old', 0, :i, :t, :v, :a, :ah, :c, :step, :cycle)"
                ),
                [
                    {"i": i, "t": t, "v": v, "a": a, "ah": ah, "c": c, "step": st, "cycle": cy}
                    for i, (t, v, a, ah, c, st, cy) in enumerate(
                        zip(
                            batch.time_s,
                            batch.voltage_V,
                            batch.current_A,
                            batch.capacity_Ah,
                            batch.temperature_C,
                            batch.step,
                            batch.cycle,
                        )
                    )
                ],
            )
            assert batch.frequency_Hz and batch.z_real_ohm and batch.z_imag_ohm
            conn.execute(
                text(
                    "INSERT INTO impedance (run_id, seq, i, frequency_hz, z_real_ohm, z_imag_ohm) "
                    "VALUES ('old', 0, :i, :f, :re, :im)"
                ),
                [
                    {"i": i, "f": f, "re": re, "im": im}
                    for i, (f, re, im) in enumerate(zip(batch.frequency_Hz, batch.z_real_ohm, batch.z_imag_ohm))
                ],
            )
    finally:
        engine.dispose()


def test_labtwin_db_upgrade_takes_a_schema_2_store_to_digests_and_conflicts(url):
    _make_schema_2_store(url)
    assert migrate.current(url) == 2
    upgraded = CliRunner().invoke(app, ["db", "upgrade", "--store", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema 2 -> {migrate.head_version()}" in upgraded.output and migrate.head_version() >= 3

    store = Store.open(url)
    try:
        assert _sql(store, "SELECT run_id, seq, n, digest FROM batches") == [("old", 0, 3, None)]  # backfilled NULL
        old = _eis(seq=0).model_copy(update={"run_id": "old"})
        again = store.write([old])
        assert (again.batches, again.duplicate_batches, again.conflicts) == (0, 1, 0)

        colliding = _forged("old", seq=0, n=3)
        counts = store.write([colliding, _batch("old", seq=1)])
        assert (counts.batches, counts.conflicts, counts.conflicting) == (1, 1, [("old", 0)])
        (conflict,) = store.conflicts("old")
        assert conflict.batch == colliding
        assert (conflict.stored_digest, conflict.incoming_digest) == (batch_digest(old), batch_digest(colliding))
        assert list(store.samples("old")["voltage_V"]) == [3.7] * 7  # the old batch stayed
        assert _sql(store, "SELECT digest FROM batches WHERE seq = 1") == [(batch_digest(_batch("old", seq=1)),)]
    finally:
        store.close()
