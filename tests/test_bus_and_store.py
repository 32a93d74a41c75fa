"""Garbled payloads never stop a subscriber; the store is idempotent on (run_id, seq)."""

import asyncio

import pytest

from labtwin import bus as busmod
from labtwin.bus import Bus, MalformedPayload, decode
from labtwin.cli.wiring import LocalLab
from labtwin.data.store import Store
from labtwin.documents import EndConditions, RunStart, SampleBatch, StepCommand, StepKind
from tests.helpers import run_steps_by_hand, sim_lab


def _batch(run_id="r", seq=0, n=5) -> SampleBatch:
    return SampleBatch(
        run_id=run_id,
        channel="ch",
        seq=seq,
        time_s=[float(i) for i in range(n)],
        voltage_V=[1.5] * n,
        current_A=[1e-3] * n,
        capacity_Ah=[0.0] * n,
        temperature_C=[25.0] * n,
        step=[0] * n,
        cycle=[1] * n,
    )


def test_decode_names_the_bad_field():
    with pytest.raises(MalformedPayload, match="voltage_V"):
        decode("labtwin/v1/l/c/data", _batch().model_dump_json().replace('"voltage_V":[1.5', '"voltage_V":["x"'))
    with pytest.raises(MalformedPayload):
        decode("labtwin/v1/l/c/cmd", b"\xff\x00not json")


GARBAGE = [b"", b"{", b"\xff\xfe", b'{"kind": "samples"}', b'{"kind": "nope", "v": 1}', b"[1,2,3]", b'{"v": 2}']


async def test_garbled_payloads_on_every_topic_are_counted_and_the_channel_keeps_working(
    broker_url, unique_lab, tmp_path
):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["ch"], broker_url, str(tmp_path / "s.db")) as local:
        async with Bus(local.url) as bad:
            for kind in ("cmd", "event", "data", "status"):
                for payload in GARBAGE:
                    await bad.publish(busmod.topic(unique_lab, "ch", kind), payload)
            await bad.flush()
        await asyncio.sleep(0.5)
        agent_bus = local.agents["ch"]._bus
        assert agent_bus.stats.malformed >= len(GARBAGE)  # the cmd ones reached the agent and were skipped
        assert local.recorder.bus.stats.malformed >= 2 * len(GARBAGE)  # data + event
        cmd = StepCommand(
            run_id="after", step_index=0, step=StepKind.rest, end=EndConditions(time_s=100), sample_interval_s=10
        )
        ended, stop = await run_steps_by_hand(local.url, unique_lab, "ch", "after", [cmd])
        await local.wait_stored("after")
        assert local.store.sample_count("after") == 10 == stop.n_samples


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store.open(tmp_path / "x.db")
    else:
        s = Store.open(request.getfixturevalue("postgres_url"))
    yield s
    s.close()


def test_a_batch_written_twice_is_stored_once(store):
    first = store.write([_batch(seq=0), _batch(seq=1)])
    again = store.write([_batch(seq=1), _batch(seq=0), _batch(seq=2)])
    assert (first.batches, again.batches, again.duplicate_batches) == (2, 1, 2)
    assert store.sample_count("r") == 15
    assert store.seqs("r") == [0, 1, 2]


def test_large_writes_store_every_row_once_and_a_row_already_there_is_kept(store):
    """PostgreSQL writes a large write's sample rows by COPY (SQLite by INSERT): each row once, re-deliveries
    skipped, and a row already there under a new batch (a database edited by hand) kept, the rest written."""
    from sqlalchemy import func, select, text

    from labtwin.data.schema import samples

    def rows(run_id: str) -> list[tuple]:
        query = select(samples.c.seq, samples.c.i, samples.c.time_s).where(samples.c.run_id == run_id)
        with store.engine.connect() as conn:
            return sorted(tuple(r) for r in conn.execute(query))

    first = store.write([_batch(run_id="big", seq=k, n=100) for k in range(3)])
    again = store.write([_batch(run_id="big", seq=k, n=100) for k in range(1, 5)])
    assert (first.samples, again.samples, again.duplicate_batches) == (300, 200, 2)
    assert rows("big") == [(k, i, float(i)) for k in range(5) for i in range(100)]
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO samples (run_id, seq, i, time_s) VALUES ('stray', 0, 7, -1.0)"))
    store.write([_batch(run_id="stray", seq=k, n=100) for k in range(2)])
    assert rows("stray") == sorted(
        [(0, i, -1.0 if i == 7 else float(i)) for i in range(100)] + [(1, i, float(i)) for i in range(100)]
    )
    with store.engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(samples).where(samples.c.run_id == "stray")).scalar()
    assert n == 200


def test_samples_come_back_in_order_with_units_in_their_names(store):
    store.write([_batch(seq=1, n=3), _batch(seq=0, n=2)])
    data = store.samples("r")
    assert list(data["time_s"]) == [0.0, 1.0, 0.0, 1.0, 2.0]
    assert set(data) >= {"voltage_V", "current_A", "capacity_Ah", "step", "cycle"}


async def test_a_batch_published_twice_on_the_bus_is_stored_once(broker_url, unique_lab, tmp_path):
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    async with LocalLab(lab, [], broker_url, str(tmp_path / "s.db")) as local:
        async with Bus(local.url) as pub:
            t = busmod.topic(unique_lab, "ch", "data")
            for _ in range(2):
                await pub.publish(t, _batch(run_id="dup", seq=0))
            await pub.publish(t, _batch(run_id="dup", seq=1))
            await pub.flush()
        for _ in range(50):
            if local.recorder.stats.documents >= 3:
                break
            await asyncio.sleep(0.1)
        assert local.recorder.stats.duplicate_batches == 1
        assert local.store.sample_count("dup") == 10


def test_every_document_kind_is_stored_once_and_read_back(store):
    """Each write statement (runs upsert, step events, impedance, the twin's findings) on both databases."""
    from labtwin.documents import Anomaly, CellState, RunStart, RunStop, StepEvent

    start = RunStart(run_id="r_1", lab="l", channel="ch", cell_id="c1", protocol="p", n_steps=1)
    ended = StepEvent(run_id="r_1", channel="ch", step_index=0, step=StepKind.eis, event="ended", time_s=5.0)
    eis = _batch(run_id="r_1", seq=0, n=3).model_copy(
        update={"frequency_Hz": [1e3, 1e2, 1e1], "z_real_ohm": [0.5, 0.6, 0.9], "z_imag_ohm": [-0.1, -0.3, -0.2]}
    )
    anomaly = Anomaly(kind="impedance_growth", cell="c1", run_id="r_1", time_s=4.0, message="R grew")
    state = CellState(cell="c1", run_id="r_1", time_s=4.0, soc=0.4)
    stop = RunStop(run_id="r_1", channel="ch", exit_status="success", n_samples=3, cell_time_s=5.0)
    first = store.write([start, eis, ended, anomaly, state])
    again = store.write([start, eis, ended, anomaly, state, stop])
    assert (first.batches, first.samples, again.batches, again.duplicate_batches) == (1, 3, 0, 1)

    (run,) = store.runs()
    assert (run.run_id, run.cell_id, run.exit_status, run.stored_samples, run.reported_samples) == (
        "r_1",
        "c1",
        "success",
        3,
        3,
    )
    assert store.run_documents("r_1") == (start, stop)
    assert store.step_events("r_1") == [ended] and store.step_events("r_1", event="started") == []
    assert list(store.impedance("r_1")["z_imag_ohm"]) == [-0.1, -0.3, -0.2]
    assert store.anomalies(cell="c1") == [anomaly] == store.anomalies(run_id="r_1")
    assert store.anomalies(cell="other") == []
    assert store.cell_states("c1") == [state] == store.cell_states("c1", run_id="r_1")
    # a run id with LIKE's wildcard in it: "r_" is a prefix of "r_1" only, not of "rx1"
    store.write([RunStart(run_id="rx1", lab="l", channel="ch", cell_id="c2", protocol="p", n_steps=1)])
    assert store.find_run("r_") == "r_1"
    with pytest.raises(KeyError, match="ambiguous"):
        store.find_run("r")


async def test_an_in_memory_store_is_one_database_for_every_thread():
    """Dry runs store into ":memory:": the recorder writes from a worker thread, the report reads from the loop's."""
    s = Store.open(":memory:")
    try:
        counts = await asyncio.gather(*(asyncio.to_thread(s.write, [_batch(seq=k)]) for k in range(8)))
        assert sum(c.batches for c in counts) == 8
        assert s.seqs("r") == list(range(8)) and s.sample_count("r") == 40
    finally:
        s.close()


def test_a_resumed_runs_second_start_keeps_the_first_start_on_record(store):
    first = RunStart(run_id="r-keep", lab="l", channel="ch1", cell_id="c", protocol="lto_formation", n_steps=21)
    store.write([first])
    again = RunStart(
        run_id="r-keep", lab="l", channel="ch1", cell_id="c", protocol="", n_steps=0, first_seq=40, flow_run_id="f2"
    )
    store.write([again])
    (row,) = [r for r in store.runs() if r.run_id == "r-keep"]
    assert row.protocol == "lto_formation"
    assert row.started_at.startswith(first.time.isoformat()[:19])
    start, _ = store.run_documents("r-keep")
    assert start is not None and start.time == first.time and (start.first_seq, start.n_steps) == (0, 21)


def test_a_run_prefix_matches_case_sensitively_on_every_backend(store):
    store.write([RunStart(run_id="abc-1", lab="l", channel="ch1", cell_id="c", protocol="p", n_steps=1)])
    assert store.find_run("abc") == "abc-1"
    with pytest.raises(KeyError):
        store.find_run("ABC")
