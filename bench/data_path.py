"""The data path as a lab deploys it, end to end, beside each part's ceiling measured in the same run.

N `labtwin agent --speed max` processes (default 16), each a simulated channel running one rest step of
--samples-per-channel samples at 1 s sampling, through a Mosquitto started for the bench, into one
`labtwin record` process writing SQLite (default) or PostgreSQL (--store postgresql://...; a schema of the
bench's own, dropped at the end). The bench drives the agents straight over MQTT (no Prefect).

The Mosquitto: `max_queued_messages 0` (no limit: a recorder that falls behind makes the broker hold the
backlog in memory instead of dropping it, the bounded run bounds that), `persistence false` (nothing is
written to disk by the broker; the agents' spools are the durable copy), max_inflight_messages 64.

Printed, each beside its reference:
  end to end: samples stored per second of wall time (first StartRun to last sample stored), produced vs
    stored, lost, the backlog (samples not yet stored when the last agent finished); the CPU each kind of
    process spent per sample (agents, recorder, Mosquitto, bench), and by thread (event loop vs the others);
  cell alone: one agent's sample loop on its simulated cell, no bus (batches dropped), in this process;
    and the agent without a bus (the loop + encoding each batch + its spool append);
  codec: pydantic encode and decode of one batch, per sample; beside orjson, msgspec JSON and msgpack,
    pyarrow IPC where installed (the wire format is not changed by any of this: measured only);
  store alone: Store.write of the same batches (decoded from the same payloads), 200 documents per write as
    the recorder does, into a database of its own;
  recorder alone: `labtwin record` fed the same runs by one raw paho publisher process (no agents);
  broker alone: the same payloads between two processes through the same Mosquitto, QoS 1: raw paho
    clients, and labtwin's Bus (with the decode on the subscriber's side).
Exits 1 and prints the count when any sample produced was not stored.

--profile DIR: the recorder and the first agent run under cProfile in every thread (bench/_launch.py);
after the run, where their time goes per sample is printed. That run is slower (cProfile), its rate is not
the figure.

    python bench/data_path.py                                   # 16 channels, 40 000 samples each, SQLite
    python bench/data_path.py --store postgresql://postgres@127.0.0.1:5432/postgres
    python bench/data_path.py --channels 4 --samples-per-channel 20000 --profile /tmp/dp-prof
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.documents import EndConditions, SampleBatch, StepCommand, StepKind  # noqa: E402
from tests.helpers import run_steps_by_hand  # noqa: E402
from tests.lab_processes import LABTWIN, Service  # noqa: E402
from tests.mosquitto_proc import MosquittoProcess  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import _drop_schema, _postgres_schema  # noqa: E402
from soak_processes import _wait_agents_ready  # noqa: E402

CELL = "lco_lgps_glassy"
LIMITS = {"voltage_min_V": 1.5, "voltage_max_V": 4.0}
TARGET_SAMPLES_PER_S = 200_000
RECORDER_DOCS_PER_WRITE = 200  # Recorder.max_batch


class BenchMosquitto(MosquittoProcess):
    """tests/mosquitto_proc.py's Mosquitto with no queue limit: the bench counts loss, the broker must not cause it."""

    def _config(self) -> str:
        text = super()._config().replace("max_queued_messages 100000", "max_queued_messages 0")
        return text + "max_queued_bytes 0\n"


def _step(samples: int) -> StepCommand:
    """The run on every channel: one rest of ``samples`` seconds of cell time at 1 s sampling."""
    return StepCommand(
        run_id="", step_index=0, step=StepKind.rest, end=EndConditions(time_s=samples), sample_interval_s=1
    )


def _rate(n: float, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s" if seconds > 0 else "n/a"


def _us(seconds: float, n: int) -> float:
    return seconds / max(n, 1) * 1e6


# ---------------------------------------------------------------------------------------------- cell alone


class _Host:
    """A StepHost with no bus: batches are kept (for the other ceilings), or encoded and spooled as an agent does."""

    def __init__(self, on_batch: Callable[[SampleBatch], None]) -> None:
        self.publish_batch = on_batch

    def publish_step_status(self, cmd: StepCommand, paused_message: str | None = None) -> None:
        pass

    def safe_state(self) -> None:
        pass

    def rest_between_steps(self) -> None:
        pass


def cell_alone(samples: int, on_batch: Callable[[SampleBatch], None]) -> tuple[float, float, int]:
    """One channel's sample loop as `labtwin agent --speed max` builds it, without a bus: (wall s, CPU s, samples)."""
    from labtwin.agent.control import StepControl
    from labtwin.agent.lease import RunContext
    from labtwin.agent.sample_loop import StepLoop
    from labtwin.agent.techniques import Techniques
    from labtwin.cli.wiring import build_channel
    from labtwin.config.lab import ChannelConfig
    from labtwin.documents import Limits, StartRun

    cfg = ChannelConfig(driver="simulated", cell=CELL, limits=Limits(**LIMITS))
    built = build_channel("cell", cfg, None)
    control = StepControl()
    loop = StepLoop(
        channel="cell",
        channel_limits=cfg.limits,
        driver=built.driver,
        clock=built.clock,
        control=control,
        techniques=Techniques(built.driver, built.clock, control, "cell", built.driver_name),
        host=_Host(on_batch),
    )
    cmd = _step(samples).model_copy(update={"run_id": "cell-alone"})
    start = StartRun(run_id="cell-alone", channel="cell", cell_id="c", protocol="p", n_steps=1)
    run = RunContext.start(start, now_cell_s=built.clock.now())
    control.begin_run(run.run_id)
    control.begin_step(cmd)
    t0, c0 = time.perf_counter(), time.process_time()
    _, stats = loop.run(cmd, cfg.limits.tighten(cmd.limits), run)
    return time.perf_counter() - t0, time.process_time() - c0, stats.n_samples


# ---------------------------------------------------------------------------------------------- codecs


def _best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def codec_costs(batches: list[SampleBatch], topic: str) -> list[tuple[str, float, float, int]]:
    """(name, encode us/sample, decode us/sample, bytes/sample) of each payload format for these batches."""
    import orjson

    from labtwin.documents.codec import decode, encode

    n = sum(len(b) for b in batches)
    rows: list[tuple[str, float, float, int]] = []
    payloads = [encode(b) for b in batches]
    enc = _best_of(lambda: [encode(b) for b in batches])
    dec = _best_of(lambda: [decode(topic, p) for p in payloads])
    rows.append(("pydantic JSON (the wire today: model_dump_json / validate_json)", enc, dec, sum(map(len, payloads))))
    dec2 = _best_of(lambda: [SampleBatch.model_validate(orjson.loads(p)) for p in payloads])
    rows.append(("  decode as orjson.loads + model_validate", enc, dec2, sum(map(len, payloads))))
    dumped = [b.model_dump() for b in batches]
    enc3 = _best_of(lambda: [orjson.dumps(d) for d in dumped])
    dec3 = _best_of(lambda: [orjson.loads(p) for p in payloads])
    rows.append(("orjson dumps/loads of the dict, no validation", enc3, dec3, sum(map(len, payloads))))
    try:
        import msgspec
    except ImportError:
        msgspec = None
    if msgspec is not None:
        struct = _msgspec_batch(msgspec)
        objs = [struct(**d) for d in dumped]
        jenc, jdec = msgspec.json.Encoder(), msgspec.json.Decoder(struct)
        jp = [jenc.encode(o) for o in objs]
        rows.append(
            (
                "msgspec JSON, typed Struct with the same bounds",
                _best_of(lambda: [jenc.encode(o) for o in objs]),
                _best_of(lambda: [jdec.decode(p) for p in jp]),
                sum(map(len, jp)),
            )
        )
        menc, mdec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(struct)
        mp = [menc.encode(o) for o in objs]
        rows.append(
            (
                "msgspec msgpack, typed Struct with the same bounds",
                _best_of(lambda: [menc.encode(o) for o in objs]),
                _best_of(lambda: [mdec.decode(p) for p in mp]),
                sum(map(len, mp)),
            )
        )
    try:
        import pyarrow as pa
    except ImportError:
        pa = None
    if pa is not None:
        columns = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")

        def arrow_encode(d: dict[str, Any]) -> bytes:
            table = pa.table({c: d[c] for c in columns})
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            return sink.getvalue().to_pybytes()

        ap = [arrow_encode(d) for d in dumped]
        rows.append(
            (
                "Arrow IPC of the columns (no bounds checked)",
                _best_of(lambda: [arrow_encode(d) for d in dumped]),
                _best_of(lambda: [pa.ipc.open_stream(p).read_all() for p in ap]),
                sum(map(len, ap)),
            )
        )
    return [(name, _us(e, n), _us(d, n), size // max(n, 1)) for name, e, d, size in rows]


def _msgspec_batch(msgspec: Any) -> type:
    """SampleBatch as a msgspec Struct with the bounds labtwin.documents.data puts on each column."""
    from typing import Annotated, Literal

    from labtwin.documents import data as d
    from labtwin.documents.base import INT_MAX, MAX_BATCH_SAMPLES

    def bound(lo: float, hi: float) -> Any:
        return Annotated[float, msgspec.Meta(ge=lo, le=hi)]

    store_int = Annotated[int, msgspec.Meta(ge=-INT_MAX - 1, le=INT_MAX)]
    count = Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]
    fields = {
        "run_id": str,
        "channel": str,
        "seq": count,
        "time_s": Annotated[list[bound(-d.TIME_BOUND_S, d.TIME_BOUND_S)], msgspec.Meta(max_length=MAX_BATCH_SAMPLES)],
        "voltage_V": list[bound(-d.VOLTAGE_BOUND_V, d.VOLTAGE_BOUND_V) | None],
        "current_A": list[bound(-d.CURRENT_BOUND_A, d.CURRENT_BOUND_A) | None],
        "capacity_Ah": list[bound(-d.CAPACITY_BOUND_AH, d.CAPACITY_BOUND_AH)],
        "temperature_C": list[bound(d.TEMPERATURE_MIN_C, d.TEMPERATURE_MAX_C) | None],
        "step": list[store_int],
        "cycle": list[store_int],
    }
    namespace: dict[str, Any] = {"__annotations__": {"v": Literal[1], "kind": Literal["samples"], **fields}}
    namespace["v"] = 1
    namespace["kind"] = "samples"
    optional = {"frequency_Hz": None, "z_real_ohm": None, "z_imag_ohm": None}
    for name in optional:
        namespace["__annotations__"][name] = list[float] | None
        namespace[name] = None
    # Required fields first: build the class with keyword-only fields so the defaults may come anywhere.
    return type("MsgspecSampleBatch", (msgspec.Struct,), namespace, kw_only=True, forbid_unknown_fields=True)


# ---------------------------------------------------------------------------------------------- store alone


def store_alone(url: str, payloads_by_channel: list[list[bytes]], topic: str) -> tuple[float, float, int]:
    """Store.write of the decoded batches, RECORDER_DOCS_PER_WRITE documents per write, channels interleaved."""
    from labtwin.data.store import Store
    from labtwin.documents import RunStart
    from labtwin.documents.codec import decode

    docs = []
    for k in range(max(len(p) for p in payloads_by_channel)):
        for payloads in payloads_by_channel:
            if k < len(payloads):
                docs.append(decode(topic, payloads[k]))
    store = Store.open(url)
    try:
        # Each run's RunStart first, as the recorder has it before the run's batches (untimed): a batch of a run the
        # store does not know yet costs a query per batch (Store._own_channel), which the end-to-end run never pays.
        store.write(
            [
                RunStart(run_id=r, lab="bench", channel=ch, cell_id="c", protocol="p", n_steps=1)
                for r, ch in dict.fromkeys((d.run_id, d.channel) for d in docs)  # type: ignore[attr-defined]
            ]
        )
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(docs), RECORDER_DOCS_PER_WRITE):
            store.write(docs[i : i + RECORDER_DOCS_PER_WRITE])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        store.close()
    return wall, cpu, sum(len(d) for d in docs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- broker alone


def _paho_client(client_id: str) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.max_inflight_messages_set(64)
    client.max_queued_messages_set(0)
    return client


def _paho_subscriber(host: str, port: int, topic: str, count: int, ready: Any, out: Any) -> None:
    client = _paho_client(f"bench-sub-{os.getpid()}")
    seen = {"n": 0, "first": 0.0, "last": 0.0}

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        if not seen["n"]:
            seen["first"] = time.perf_counter()
        seen["n"] += 1
        if seen["n"] >= count:
            seen["last"] = time.perf_counter()
            c.disconnect()

    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.set()
    client.connect(host, port, keepalive=60)
    client.subscribe(topic, qos=1)
    t_end = time.monotonic() + 300
    c0 = time.process_time()
    while seen["n"] < count and time.monotonic() < t_end:
        client.loop(0.1)
    out.put(("sub", seen["n"], seen["first"], seen["last"], time.process_time() - c0))


def _paho_publisher(host: str, port: int, topic: str, payloads: list[bytes], count: int, out: Any) -> None:
    client = _paho_client(f"bench-pub-{os.getpid()}")
    client.connect(host, port, keepalive=60)
    c0 = time.process_time()  # both threads: the caller's publish and paho's network loop
    client.loop_start()
    infos = [client.publish(topic, payloads[k % len(payloads)], qos=1) for k in range(count)]
    for info in infos:
        info.wait_for_publish(60)
    client.loop_stop()
    out.put(("pub", count, 0.0, 0.0, time.process_time() - c0))
    client.disconnect()


async def _bus_subscriber_main(url: str, topic: str, count: int, ready: Any, out: Any) -> None:
    from labtwin.bus import Bus

    async with Bus(url) as bus:
        sub = await bus.subscribe(topic)
        ready.set()
        first = 0.0
        c0 = time.process_time()
        for k in range(count):
            try:
                await sub.get(60)
            except TimeoutError:
                out.put(("sub", k, first, time.perf_counter(), time.process_time() - c0))
                return
            if k == 0:
                first = time.perf_counter()
        out.put(("sub", count, first, time.perf_counter(), time.process_time() - c0))


def _bus_subscriber(url: str, topic: str, count: int, ready: Any, out: Any) -> None:
    asyncio.run(_bus_subscriber_main(url, topic, count, ready, out))


async def _bus_publisher_main(url: str, topic: str, payloads: list[bytes], count: int, out: Any) -> None:
    from labtwin.bus import Bus

    async with Bus(url) as bus:
        c0 = time.process_time()
        for k in range(count):
            await bus.publish(topic, payloads[k % len(payloads)])
        await bus.flush(120)
        out.put(("pub", count, 0.0, 0.0, time.process_time() - c0))


def _bus_publisher(url: str, topic: str, payloads: list[bytes], count: int, out: Any) -> None:
    asyncio.run(_bus_publisher_main(url, topic, payloads, count, out))


def mosquitto_clients(broker: MosquittoProcess, payloads: list[bytes], count: int) -> tuple[float, int]:
    """The broker with its own C clients (mosquitto_pub -l, mosquitto_sub -C), QoS 1: its ceiling without Python.
    (s from the publisher's start to the subscriber's last message, messages), or (0, 0) without the clients."""
    pub_bin, sub_bin = shutil.which("mosquitto_pub"), shutil.which("mosquitto_sub")
    if not pub_bin or not sub_bin or any(b"\n" in p for p in payloads):
        return 0.0, 0
    topic = f"labtwin/v1/bench{os.getpid()}/c/data"
    where = ["-h", broker.host, "-p", str(broker.port), "-q", "1", "-t", topic]
    sub = subprocess.Popen([sub_bin, *where, "-C", str(count)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # subscribed (mosquitto_sub says nothing when it is)
        lines = b"".join(payloads[k % len(payloads)] + b"\n" for k in range(count))
        t0 = time.perf_counter()
        subprocess.run([pub_bin, *where, "-l"], input=lines, check=True, stderr=subprocess.DEVNULL, timeout=300)
        sub.wait(300)
        return time.perf_counter() - t0, count
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(10)


def broker_alone(broker: MosquittoProcess, payloads: list[bytes], count: int, labtwin_bus: bool) -> dict[str, float]:
    """Messages between a publisher process and a subscriber process through the broker: wall s (the subscriber's
    first to last message), messages received, and each side's CPU s."""
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    topic = f"labtwin/v1/bench{os.getpid()}/{'bus' if labtwin_bus else 'raw'}/data"
    if labtwin_bus:
        sub = ctx.Process(target=_bus_subscriber, args=(broker.url, topic, count, ready, out))
        pub = ctx.Process(target=_bus_publisher, args=(broker.url, topic, payloads, count, out))
    else:
        sub = ctx.Process(target=_paho_subscriber, args=(broker.host, broker.port, topic, count, ready, out))
        pub = ctx.Process(target=_paho_publisher, args=(broker.host, broker.port, topic, payloads, count, out))
    sub.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("broker alone: the subscriber did not subscribe within 60 s")
        pub.start()
        reports = {}
        for _ in range(2):
            side, got, first, last, cpu = out.get(timeout=600)
            reports[side] = (got, first, last, cpu)
        pub.join(60)
    finally:
        for p in (pub, sub):
            if p.is_alive():
                p.kill()
            if p.pid is not None:
                p.join(10)
    got, first, last, sub_cpu = reports["sub"]
    return {"wall": last - first, "messages": got, "sub_cpu": sub_cpu, "pub_cpu": reports["pub"][3]}


def regroup(batches: list[SampleBatch], k: int) -> list[SampleBatch]:
    """Every ``k`` consecutive batches as one (what an agent with batch_size k x 100 would send)."""
    columns = ("time_s", "voltage_V", "current_A", "capacity_Ah", "temperature_C", "step", "cycle")
    out = []
    for seq, i in enumerate(range(0, len(batches), k)):
        group = batches[i : i + k]
        data = {c: [x for b in group for x in getattr(b, c)] for c in columns}
        out.append(
            SampleBatch.model_construct(
                run_id=group[0].run_id, channel=group[0].channel, seq=seq, v=1, kind="samples", **data
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- end to end


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.NoSuchProcess:
        return 0.0


def _threads_cpu_s(pids: list[int]) -> tuple[float, float]:
    """CPU seconds of these processes' main threads (the event loop) and of all their other threads together."""
    main = other = 0.0
    for pid in pids:
        try:
            for t in psutil.Process(pid).threads():
                if t.id == pid:
                    main += t.user_time + t.system_time
                else:
                    other += t.user_time + t.system_time
        except psutil.NoSuchProcess:
            pass
    return main, other


def _stored(store_url: str, prefix: str, exact: bool = False) -> int:
    from sqlalchemy import func, select

    from labtwin.data.schema import batches, samples
    from labtwin.data.store import Store

    try:
        reader = Store.open(store_url, read_only=True)
    except Exception:
        return 0
    try:
        if exact:  # the rows themselves
            query = select(func.count()).select_from(samples).where(samples.c.run_id.like(f"{prefix}%"))
        else:  # the batches' counts: a hundredth of the rows, while the recorder is writing
            query = select(func.coalesce(func.sum(batches.c.n), 0)).where(batches.c.run_id.like(f"{prefix}%"))
        with reader.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
    except Exception:
        return 0
    finally:
        reader.close()


def _paho_publish_all(host: str, port: int, messages: list[tuple[str, bytes]], out: Any) -> None:
    client = _paho_client(f"bench-rec-pub-{os.getpid()}")
    client.connect(host, port, keepalive=60)
    client.loop_start()
    infos = [client.publish(t, p, qos=1) for t, p in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.loop_stop()
    out.put(time.perf_counter())
    client.disconnect()


async def recorder_alone(
    work: Path, broker: BenchMosquitto, store_url: str, batches: list[SampleBatch], channels: int
) -> dict[str, float]:
    """`labtwin record` fed by one raw paho publisher process (faster than the recorder), no agents: the batches of
    ``channels`` runs (each run's RunStart first), from the first publish to the last sample stored, and the
    recorder's CPU over that time."""
    from labtwin.documents import RunStart
    from labtwin.documents.codec import encode

    lab = f"rec{os.getpid()}"
    prefix = "rec-alone-"
    lab_file = work / "rec-lab.yaml"
    lab_file.write_text(
        yaml.safe_dump(
            {"lab": lab, "channels": {f"s{c:02d}": {"driver": "simulated", "cell": CELL} for c in range(channels)}}
        )
    )
    env = {**os.environ, "LABTWIN_BROKER": broker.url, "LABTWIN_LAB": str(lab_file)}
    folder = work / "recorder-alone"
    folder.mkdir()
    recorder = Service("recorder-alone", [LABTWIN, "record", "--store", store_url], folder, env).start()
    messages: list[tuple[str, bytes]] = []
    for c in range(channels):
        ch, run = f"s{c:02d}", f"{prefix}{c:02d}"
        start = RunStart(run_id=run, lab=lab, channel=ch, cell_id="c", protocol="p", n_steps=1)
        messages.append((f"labtwin/v1/{lab}/{ch}/event", encode(start)))
    for k in range(len(batches)):
        for c in range(channels):
            ch, run = f"s{c:02d}", f"{prefix}{c:02d}"
            messages.append(
                (f"labtwin/v1/{lab}/{ch}/data", encode(batches[k].model_copy(update={"run_id": run, "channel": ch})))
            )
    total = channels * sum(len(b) for b in batches)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    try:
        deadline = time.monotonic() + 60
        while "recording lab" not in recorder.logs() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # subscribed
        pub = ctx.Process(target=_paho_publish_all, args=(broker.host, broker.port, messages, out))
        assert recorder.proc is not None
        cpu0 = _cpu_s(recorder.proc.pid)
        t0 = time.perf_counter()
        pub.start()
        stored, last_change, last = 0, time.monotonic(), -1
        while stored < total and time.monotonic() - last_change < 30:
            await asyncio.sleep(0.1)
            stored = await asyncio.to_thread(_stored, store_url, prefix)
            if stored != last:
                last, last_change = stored, time.monotonic()
        wall = time.perf_counter() - t0
        cpu = _cpu_s(recorder.proc.pid) - cpu0
        published_at = out.get(timeout=60) - t0
        pub.join(30)
    finally:
        recorder.stop()
    return {"wall": wall, "cpu": cpu, "stored": stored, "total": total, "published": published_at}


async def end_to_end(args: argparse.Namespace, work: Path, broker: BenchMosquitto, store_url: str) -> dict[str, Any]:
    names = [f"s{i:02d}" for i in range(args.channels)]
    lab_name = f"dp{os.getpid()}"
    lab_file = work / "lab.yaml"
    lab_file.write_text(
        yaml.safe_dump(
            {
                "lab": lab_name,
                "channels": {
                    n: {"driver": "simulated", "cell": CELL, "cell_id": f"{n}-cell", "limits": LIMITS} for n in names
                },
            }
        )
    )
    env = {**os.environ, "LABTWIN_BROKER": broker.url, "LABTWIN_LAB": str(lab_file)}
    profiled = ["recorder", names[0]] if args.profile else []

    def command(who: str, labtwin_args: list[str]) -> list[str]:
        launch = [sys.executable, str(Path(__file__).with_name("_launch.py"))]
        options = []
        if who in profiled:
            options += ["--profile", str(args.profile / f"{who}.prof")]
        if who != "recorder" and args.agent_batch_size:
            options += ["--agent-batch-size", str(args.agent_batch_size)]
        base = [*launch, *options] if options else [LABTWIN]
        if who != "recorder" and args.agents_nice:
            return ["nice", "-n", str(args.agents_nice), *base]
        return base

    services: list[Service] = []
    recorder = Service("recorder", [], work, env)
    recorder.args = [*command("recorder", []), "record", "--store", store_url]
    services.append(recorder.start())
    agents = []
    for n in names:
        a = Service(n, [*command(n, []), "agent", "--channel", n, "--speed", "max"], work, env)
        agents.append(a)
        services.append(a.start())
    result: dict[str, Any] = {"names": names, "profiled": profiled}
    prefix = f"dp-{os.getpid()}-"
    try:
        await _wait_agents_ready(broker.url, lab_name, names, services, 180.0)
        await asyncio.sleep(2.0)  # the recorder subscribes
        pids = {
            "agents": [a.proc.pid for a in agents if a.proc],
            "recorder": [recorder.proc.pid] if recorder.proc else [],
            "mosquitto": [broker.pid] if broker.pid else [],
            "bench": [os.getpid()],
        }
        for who in profiled:  # the profile starts now: imports and start-up are left out
            service = recorder if who == "recorder" else agents[names.index(who)]
            if service.proc is not None:
                os.kill(service.proc.pid, signal.SIGUSR1)
        cpu0 = {k: sum(_cpu_s(p) for p in v) for k, v in pids.items()}
        threads0 = {k: _threads_cpu_s(pids[k]) for k in ("agents", "recorder")}
        step = _step(args.samples_per_channel)
        t0 = time.perf_counter()
        produced_at: list[float] = []

        async def drive(n: str) -> Any:
            out = await run_steps_by_hand(
                broker.url,
                lab_name,
                n,
                f"{prefix}{n}",
                [step.model_copy(update={"run_id": f"{prefix}{n}"})],
                step_timeout_s=600,
            )
            produced_at.append(time.perf_counter())
            return out

        results = await asyncio.gather(*(drive(n) for n in names))
        produced = sum(stop.n_samples for _, stop in results)
        t_produced = max(produced_at) - t0
        recorder_cpu_produced = sum(_cpu_s(p) for p in pids["recorder"]) - cpu0["recorder"]
        backlog = produced - await asyncio.to_thread(_stored, store_url, prefix)
        stored, t_stored = 0, 0.0
        last_change, last_count = time.monotonic(), -1
        while True:
            stored = await asyncio.to_thread(_stored, store_url, prefix)
            now = time.perf_counter()
            if stored >= produced:
                t_stored = now - t0
                break
            if stored != last_count:
                last_change, last_count = time.monotonic(), stored
            elif time.monotonic() - last_change > args.drain_timeout_s:
                t_stored = now - t0
                break
            await asyncio.sleep(0.1)
        cpu1 = {k: sum(_cpu_s(p) for p in v) for k, v in pids.items()}
        threads1 = {k: _threads_cpu_s(pids[k]) for k in ("agents", "recorder")}
        result.update(
            produced=produced,
            stored_batches_sum=stored,
            t_produced=t_produced,
            backlog=backlog,
            recorder_cpu_produced=recorder_cpu_produced,
            t_stored=t_stored,
            cpu={k: cpu1[k] - cpu0[k] for k in cpu0},
            threads={k: (threads1[k][0] - threads0[k][0], threads1[k][1] - threads0[k][1]) for k in threads0},
        )
    finally:
        for s in services:
            s.stop()
    result["stored"] = _stored(store_url, prefix, exact=True)
    logs = "\n".join(s.logs() for s in services)
    result["shed_warnings"] = logs.count("the store is behind")
    result["resend_lines"] = len(re.findall(r"asking again for", logs))
    result["broker_dropped"] = broker.log_text().count("Outgoing messages are being dropped")
    result["errors"] = [line for line in logs.splitlines() if "Traceback" in line or " ERROR " in line][:5]
    return result


# ---------------------------------------------------------------------------------------------- profile


_GROUPS = (
    ("pydantic (encode/decode/validate)", ("pydantic", "pydantic_core")),
    ("paho / aiomqtt (MQTT client)", ("paho", "aiomqtt")),
    ("asyncio (event loop, queues, tasks)", ("asyncio", "selectors", "select.")),
    ("sqlite3 / SQLAlchemy / psycopg (store)", ("sqlalchemy", "sqlite3", "psycopg", "labtwin/data/")),
    ("spool (agent's SQLite journal)", ("labtwin/agent/spool",)),
    ("labtwin bus client", ("labtwin/bus/",)),
    ("signing / security", ("labtwin/security/",)),
    ("simulated cell (physics, simulator)", ("labtwin/physics", "labtwin/simulators", "numpy", "scipy")),
    ("agent sample loop, safety, batching", ("labtwin/agent/",)),
    ("threads (hand-offs, locks, executor)", ("threading", "concurrent", "queue.py")),
    ("socket / ssl", ("socket", "ssl")),
)


def _group_of(key: tuple[str, int, str]) -> str:
    filename, _, func = key
    text = f"{filename}:{func}"
    for name, needles in _GROUPS:
        if any(n in text for n in needles):
            return name
    if filename == "~":
        return f"builtins ({func.split(' of ')[0][:50]})" if "method" in func else f"builtins ({func[:50]})"
    return "other"


def profile_report(path: Path, samples: int, top: int = 12) -> list[str]:
    """Own time (tottime) per sample: by group, and the top functions."""
    if not path.exists():
        return [f"  {path.name}: no profile written"]
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    groups: dict[str, float] = {}
    for key, v in raw.items():
        groups[_group_of(key)] = groups.get(_group_of(key), 0.0) + v[2]
    lines = [f"  {path.stem}: {total:.1f} s of CPU under cProfile in the run, {_us(total, samples):.2f} us/sample"]
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"    {_us(t, samples):6.2f} us/sample {t / total:6.1%}  {name}")
    lines.append("    top functions by own time:")
    for key, v in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        filename, line, func = key
        where = f"{Path(filename).parent.name}/{Path(filename).name}:{line}" if filename != "~" else "~"
        lines.append(
            f"    {_us(v[2], samples):6.2f} us/sample {v[2] / total:6.1%}  {func[:60]}  {where}  ({v[1]:,} calls)"
        )
    return lines


# ---------------------------------------------------------------------------------------------- main


def _cpu_rate(n: int, cpu_s: float) -> str:
    return f"{n / cpu_s:,.0f} samples per CPU s ({_us(cpu_s, n):.2f} us/sample)" if cpu_s > 0 else "n/a"


async def main(args: argparse.Namespace) -> int:
    from labtwin.agent.spool import Spool
    from labtwin.documents.codec import encode

    work = Path(tempfile.mkdtemp(prefix="labtwin-datapath-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    schemas: list[str] = []
    postgres = bool(args.store and args.store.startswith("postgresql"))

    def new_store(name: str) -> str:
        if postgres:
            url, schema = _postgres_schema(args.store)
            schemas.append(schema)
            return url
        return str(work / f"{name}.db")

    broker = BenchMosquitto(work / "mosquitto")
    topic = "labtwin/v1/bench/cell/data"
    big = args.big_batch
    try:
        # Cell alone: best of 3 (the machine is shared); the batches of the last run feed the other ceilings.
        cell = []
        kept: list[SampleBatch] = []
        for _ in range(3):
            kept = []
            cell.append(cell_alone(args.samples_per_channel, kept.append))
        cell_s, cell_cpu, cell_n = min(cell)
        payloads = [encode(b) for b in kept]
        per_message = cell_n / max(len(payloads), 1)
        spool = Spool(work / "spool-alone" / "bench-cell.db")
        try:
            spool_s = _best_of(lambda: [spool.append(topic, p, "spool-alone", k) for k, p in enumerate(payloads)])
        finally:
            spool.close()
        codecs = codec_costs(kept, topic)
        kept_big = regroup(kept, big) if big > 1 else []

        # Store alone: the same batches for every channel, under run ids of its own.
        def per_channel(batches: list[SampleBatch]) -> list[list[bytes]]:
            return [
                [encode(b.model_copy(update={"run_id": f"store-alone-{c}", "channel": f"s{c:02d}"})) for b in batches]
                for c in range(args.channels)
            ]

        store = store_alone(new_store("store-alone"), per_channel(kept), topic)
        store_big = store_alone(new_store("store-alone-big"), per_channel(kept_big), topic) if kept_big else None
        broker.start()
        messages = args.channels * len(payloads)
        mosq_s, mosq_n = mosquitto_clients(broker, payloads, messages)
        raw = broker_alone(broker, payloads, messages, labtwin_bus=False)
        bus = broker_alone(broker, payloads, messages, labtwin_bus=True)
        bus_big = None
        if kept_big:
            big_payloads = [encode(b) for b in kept_big]
            bus_big = broker_alone(broker, big_payloads, args.channels * len(big_payloads), labtwin_bus=True)
        rec = await recorder_alone(work, broker, new_store("recorder-alone"), kept, args.channels)
        e2e = await end_to_end(args, work, broker, new_store("end-to-end"))
    finally:
        broker.stop()
        for schema in schemas:
            _drop_schema(args.store, schema)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    cores = os.cpu_count() or 1
    produced, stored = e2e["produced"], e2e["stored"]
    lost = produced - stored
    e2e_rate = stored / e2e["t_stored"] if e2e["t_stored"] else 0.0
    where = "PostgreSQL (a schema of its own, dropped)" if postgres else "SQLite WAL"
    out: list[str] = []
    out.append(
        f"data path: {args.channels} `labtwin agent --speed max` processes ({CELL}, one rest step of "
        f"{args.samples_per_channel:,} samples each, {per_message:.0f} samples per batch) -> Mosquitto "
        f"(max_queued_messages 0, persistence false) -> `labtwin record` -> {where}; {cores} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    if args.agents_nice:
        out.append(f"  AGENTS UNDER nice -n {args.agents_nice}")
    if args.agent_batch_size:
        out.append(f"  AGENTS WITH {args.agent_batch_size}-SAMPLE BATCHES (bench/_launch.py; labtwin's default is 100)")
    if e2e["profiled"]:
        out.append(
            f"  PROFILED RUN: {', '.join(e2e['profiled'])} under cProfile (slower: read the split, not the rate)"
        )
    out.append(
        f"end to end: {e2e_rate:,.0f} samples/s stored ({stored:,} in {e2e['t_stored']:.2f} s, first StartRun to "
        f"last sample stored), {e2e_rate / TARGET_SAMPLES_PER_S:.2f}x the target {TARGET_SAMPLES_PER_S:,}/s; "
        f"produced in {e2e['t_produced']:.2f} s ({_rate(produced, e2e['t_produced'])})"
    )
    out.append(
        f"  backlog when the last agent finished: {e2e['backlog']:,} samples not yet stored "
        f"({e2e['backlog'] / max(produced, 1):.0%} of the run; in the broker's queue and the recorder); the recorder "
        f"used {e2e['recorder_cpu_produced'] / max(e2e['t_produced'], 1e-9):.2f} cores while the agents ran, "
        f"{(e2e['cpu']['recorder'] - e2e['recorder_cpu_produced']) / max(e2e['t_stored'] - e2e['t_produced'], 1e-9):.2f} "
        "after"
    )
    out.append(
        f"  produced {produced:,}, stored {stored:,}, lost {lost} (Mosquitto 'dropped' lines "
        f"{e2e['broker_dropped']}, recorder shed warnings {e2e['shed_warnings']}, resend lines {e2e['resend_lines']})"
    )
    cpu = e2e["cpu"]
    total_cpu = sum(cpu.values())
    if stored and e2e["t_stored"]:
        out.append(
            f"  CPU per sample: {_us(total_cpu, stored):.2f} us in all = "
            + " + ".join(f"{k} {_us(v, stored):.2f}" for k, v in cpu.items())
            + f"; {total_cpu / e2e['t_stored']:.2f} of {cores} cores busy on average; at this CPU per sample "
            f"{cores} free cores would store {cores / total_cpu * stored:,.0f}/s"
        )
        (a_main, a_other), (r_main, r_other) = e2e["threads"]["agents"], e2e["threads"]["recorder"]
        out.append(
            f"  by thread: agents' event loops (spool pump, Bus, MQTT) {_us(a_main, stored):.2f} us/sample, their step "
            f"threads (sample loop, encode, spool append) {_us(a_other, stored):.2f}; recorder's event loop (receive, "
            f"decode) {_us(r_main, stored):.2f}, its store threads (Store.write) {_us(r_other, stored):.2f}"
        )
        agent_bus = _us(cpu["agents"], stored) - _us(cell_cpu, cell_n)
        out.append(
            f"  the agents spent {_us(cpu['agents'], stored):.2f} us/sample beside the cell alone's "
            f"{_us(cell_cpu, cell_n):.2f}: {agent_bus:.2f} us/sample for encode, spool, bus and the step's round trip"
        )
    out.append(
        f"cell alone (one agent's sample loop on its cell, no bus, best of 3): {_rate(cell_n, cell_s)} wall, "
        f"{_cpu_rate(cell_n, cell_cpu)}; x {cores} cores = {cores * cell_n / cell_cpu:,.0f}/s of CPU, end to end "
        f"is {e2e_rate / (cores * cell_n / cell_cpu):.2f}x of it"
    )
    enc_us = codecs[0][1]
    out.append(
        f"  what an agent adds per sample without a bus: encode {enc_us:.2f} us + spool append "
        f"{_us(spool_s, cell_n):.2f} us ({_us(spool_s, len(payloads)):.0f} us per batch) = "
        f"{(enc_us + _us(spool_s, cell_n)) / _us(cell_cpu, cell_n):.0%} of the loop"
    )
    store_s, store_cpu, store_n = store
    out.append(
        f"store alone (Store.write of the same batches, {RECORDER_DOCS_PER_WRITE} docs per write, {where}): "
        f"{_rate(store_n, store_s)} wall, {_cpu_rate(store_n, store_cpu)}"
        + (" (this process; the server's CPU not counted)" if postgres else "")
        + f"; end to end is {e2e_rate / (store_n / store_s):.2f}x of its wall rate"
    )
    if store_big is not None:
        out.append(
            f"  with {big * per_message:.0f}-sample batches: {_rate(store_big[2], store_big[0])} wall, "
            f"{_cpu_rate(store_big[2], store_big[1])} ({store_cpu / store_n / (store_big[1] / store_big[2]):.2f}x)"
        )
    out.append(
        f"recorder alone (`labtwin record` fed by one raw paho publisher, the same {args.channels} runs, no agents): "
        f"{_rate(rec['stored'], rec['wall'])} stored ({rec['stored']:,} of {rec['total']:,}; published in "
        f"{rec['published']:.2f} s), {_us(rec['cpu'], rec['stored']):.2f} us of its CPU per sample, "
        f"{rec['cpu'] / rec['wall']:.2f} cores busy; end to end is {e2e_rate / (rec['stored'] / rec['wall']):.2f}x of it"
    )
    if mosq_s:
        out.append(
            f"broker alone, Mosquitto with its C clients (mosquitto_pub -l | mosquitto_sub, QoS 1, {messages:,} "
            f"messages of {len(payloads[0]):,} B): {_rate(mosq_n * per_message, mosq_s)} samples "
            f"({_rate(mosq_n, mosq_s)} messages); Mosquitto's own CPU end to end "
            f"{_us(cpu['mosquitto'], stored):.2f} us/sample = {stored / max(cpu['mosquitto'], 1e-9):,.0f} samples per CPU s"
        )
    for name, r in (("raw paho clients", raw), ("labtwin Bus to Bus (decode included)", bus)):
        rate = r["messages"] * per_message / r["wall"] if r["wall"] else 0.0
        n_s = r["messages"] * per_message
        out.append(
            f"broker alone, {name}, two processes: {rate:,.0f} samples/s ({r['messages'] / r['wall']:,.0f} msg/s); "
            f"CPU per sample: publisher {_us(r['pub_cpu'], int(n_s)):.2f} us, subscriber "
            f"{_us(r['sub_cpu'], int(n_s)):.2f} us; end to end is {e2e_rate / rate:.2f}x of it"
            if r["wall"]
            else f"broker alone, {name}: n/a"
        )
    if bus_big is not None and bus_big["wall"]:
        n_big = sum(len(b) for b in kept_big) * args.channels
        out.append(
            f"  Bus to Bus with {big * per_message:.0f}-sample batches: {n_big / bus_big['wall']:,.0f} samples/s; "
            f"CPU per sample publisher {_us(bus_big['pub_cpu'], n_big):.2f} us, subscriber "
            f"{_us(bus_big['sub_cpu'], n_big):.2f} us"
        )
    ref = codecs[0]
    out.append("codec per sample (encode us, decode us, bytes; encode+decode beside today's pydantic JSON):")
    for name, enc, dec, size in codecs:
        out.append(f"  {enc:6.2f} {dec:6.2f} {size:4d} B  {(ref[1] + ref[2]) / (enc + dec):5.2f}x as fast  {name}")
    if args.profile:
        out.append(f"profile (own CPU time per sample; {args.profile}):")
        out += profile_report(args.profile / "recorder.prof", stored)
        out += profile_report(args.profile / "recorder.main.prof", stored)
        per_agent = produced // max(len(e2e["names"]), 1)
        out += profile_report(args.profile / f"{e2e['names'][0]}.prof", per_agent)
        out += profile_report(args.profile / f"{e2e['names'][0]}.main.prof", per_agent)
    for line in e2e["errors"]:
        out.append(f"log: {line[:200]}")
    code = 0
    if lost:
        out.append(f"LOST {lost} samples of {produced:,}")
        code = 1
    print("\n".join(out))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "end_to_end_samples_per_s": e2e_rate,
                    "produced": produced,
                    "stored": stored,
                    "lost": lost,
                    "cpu_s": cpu,
                    "threads_cpu_s": e2e["threads"],
                    "cell_alone": {"wall_s": cell_s, "cpu_s": cell_cpu, "samples": cell_n},
                    "store_alone": {"wall_s": store_s, "cpu_s": store_cpu, "samples": store_n},
                    "broker_alone_mosquitto_clients": {"wall_s": mosq_s, "messages": mosq_n},
                    "broker_alone_paho": raw,
                    "broker_alone_bus": bus,
                    "codecs_us_per_sample": codecs,
                }
            )
        )
    return code


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--samples-per-channel", type=int, default=40_000)
    p.add_argument("--store", default=None, help="default: SQLite in the bench's folder; or postgresql://...")
    p.add_argument("--profile", type=Path, default=None, help="cProfile the recorder and the first agent into DIR")
    p.add_argument("--drain-timeout-s", type=float, default=60.0, help="give up when the store stops growing this long")
    p.add_argument(
        "--agent-batch-size",
        type=int,
        default=None,
        help="agents batch this many samples (Agent's default 100; set through bench/_launch.py)",
    )
    p.add_argument(
        "--agents-nice",
        type=int,
        default=0,
        help="start the agents under `nice -n N`: 16 CPU-bound agents on 2 cores otherwise get 16/17 of the CPU "
        "and the recorder's backlog grows in the broker until they finish",
    )
    p.add_argument("--big-batch", type=int, default=10, help="ceilings also with this many batches merged into one")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="keep the bench's folder (logs, stores, spools)")
    sys.exit(asyncio.run(main(p.parse_args())))
