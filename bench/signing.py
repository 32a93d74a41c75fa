"""What signing costs a secured lab: microseconds per sign and verify, and samples/s end to end with and without.

Two parts, in one run, each figure printed beside its reference:

1. Per document, for a StopRun command and a 100-sample SampleBatch: ``Signer.seal`` (Ed25519 over topic, sender,
   nonce and body, plus the header) and ``Verifier.check`` (header parse, signature, the sender's right to the
   topic, a command's freshness), beside ``encode`` / ``decode`` of the same document, which every message pays
   anyway. Median of several rounds of many calls each.
2. End to end: 4 simulated channels at max speed for a fixed cell time, agents -> embedded broker -> recorder ->
   SQLite (as bench/bus_throughput.py: no Prefect), once on an unsigned lab and once with a security profile
   written by ``labtwin lab secure`` (every batch and event signed by its agent and verified by the recorder,
   every command signed by the orchestrator and verified by the agent). The embedded broker has no TLS, so this
   is the cost of signing alone; rounds alternate so machine load falls on both alike.

    python bench/signing.py                  # about a minute
    python bench/signing.py --hours 2 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bus_throughput import charge_and_rest  # noqa: E402  (bench/ is on sys.path when this script runs)

from labtwin import bus as busmod  # noqa: E402
from labtwin.cli.wiring import LocalLab  # noqa: E402
from labtwin.config.secure_lab import secure_lab  # noqa: E402
from labtwin.documents import SampleBatch, StopRun  # noqa: E402
from labtwin.documents.codec import decode, encode  # noqa: E402
from labtwin.security import as_identity, load_profile  # noqa: E402
from labtwin.security.policy import Verifier  # noqa: E402
from labtwin.security.signing import Signer  # noqa: E402
from tests.helpers import run_steps_by_hand, sim_lab  # noqa: E402

LAB = "bench"
CELL = "lco_lgps_glassy"


def write_profile(root: Path, channels: list[str]) -> Path:
    """A lab file of the bench's channels secured as a lab would be (built-in password hashing: no tool needed)."""
    config = sim_lab(LAB, {n: CELL for n in channels})
    lab_file = root / "lab.yaml"
    lab_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)), encoding="utf-8")
    return secure_lab(lab_file, root / "secured", passwd_tool=False).out / "security.yaml"


def per_call_us(fn: Callable[[int], object], calls: int, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of ``calls`` calls of ``fn(i)``, in microseconds."""
    times = []
    for r in range(rounds):
        base = r * calls
        t0 = time.perf_counter_ns()
        for i in range(calls):
            fn(base + i)
        times.append((time.perf_counter_ns() - t0) / calls / 1e3)
    return statistics.median(times)


def batch_of(n: int) -> SampleBatch:
    rng = random.Random(1)
    return SampleBatch(
        run_id="bench-ch00",
        channel="ch00",
        seq=42,
        time_s=[float(i) for i in range(n)],
        voltage_V=[3.7 + rng.uniform(-0.01, 0.01) for _ in range(n)],
        current_A=[2.4e-4 + rng.uniform(-1e-7, 1e-7) for _ in range(n)],
        capacity_Ah=[i * 2.4e-4 / 3600 for i in range(n)],
        temperature_C=[25.0 + rng.uniform(-0.1, 0.1) for _ in range(n)],
        step=[0] * n,
        cycle=[1] * n,
    )


def micro(profile_path: Path, calls: int, rounds: int) -> None:
    profile = load_profile(profile_path)

    def signer(name: str) -> Signer:
        key = profile.identity(name).signing_key
        assert key is not None
        return Signer.from_file(name, key)

    cases = [
        (
            "StopRun command",
            busmod.topic(LAB, "ch00", "cmd"),
            StopRun(run_id="bench-ch00", exit_status="aborted", reason="bench"),
            signer("orchestrator"),
        ),
        ("100-sample SampleBatch", busmod.topic(LAB, "ch00", "data"), batch_of(100), signer("agent-ch00")),
    ]
    print(f"per document (median of {rounds} rounds x {calls} calls), microseconds:")
    print(f"  {'document':24} {'bytes':>7} {'+sig B':>7} {'encode':>8} {'sign':>8} {'decode':>8} {'verify':>8}")
    for name, topic, doc, s in cases:
        measure(name, topic, doc, s, Verifier(profile), calls, rounds)
    # Where the time goes: the bare Ed25519 operations of `cryptography` on a 100-byte message.
    key = Ed25519PrivateKey.generate()
    public, message = key.public_key(), b"x" * 100
    signature = key.sign(message)
    raw_sign = per_call_us(lambda i: key.sign(message), calls, rounds)
    raw_verify = per_call_us(lambda i: public.verify(signature, message), calls, rounds)
    print(f"  bare Ed25519 (cryptography): sign {raw_sign:.1f} us, verify {raw_verify:.1f} us")


def measure(name: str, topic: str, doc: BaseModel, signer: Signer, verifier: Verifier, calls: int, rounds: int) -> None:
    """One line: the document's size and signature overhead, encode, sign, decode, verify (microseconds)."""
    body = encode(doc)
    enc_us = per_call_us(lambda i: encode(doc), calls, rounds)
    dec_us = per_call_us(lambda i: decode(topic, body), calls, rounds)
    sign_us = per_call_us(lambda i: signer.seal(topic, body), calls, rounds)
    # Verify pays what a receiver pays: each payload sealed afresh (a command's nonce must be new to be fresh).
    sealed = [signer.seal(topic, body) for _ in range(calls * rounds)]
    ver_us = per_call_us(lambda i: verifier.check(topic, sealed[i]), calls, rounds)
    overhead = len(sealed[0]) - len(body)
    print(
        f"  {name:24} {len(body):7d} {overhead:7d} {enc_us:8.1f} {sign_us:8.1f} {dec_us:8.1f} {ver_us:8.1f}"
        f"   sign+verify {sign_us + ver_us:.1f} us vs encode+decode {enc_us + dec_us:.1f} us"
        f" ({(sign_us + ver_us) / (enc_us + dec_us):.1f}x)"
    )


async def end_to_end(channels: list[str], hours: float, security: Path | None) -> tuple[int, int, float]:
    """(produced, stored, wall s) of one run of every channel, agents to store."""
    lab = sim_lab(LAB, {n: CELL for n in channels})
    db = Path(tempfile.mkdtemp(prefix="labtwin-bench-")) / "bench.db"
    steps = charge_and_rest(hours)
    async with LocalLab(lab, channels, None, str(db), security=security) as local:
        orchestrator = as_identity(local.url, "orchestrator")
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                run_steps_by_hand(
                    orchestrator,  # type: ignore[arg-type]  # a BrokerConnection serves where a URL goes
                    LAB,
                    n,
                    f"bench-{n}",
                    [s.model_copy(update={"run_id": f"bench-{n}"}) for s in steps],
                )
                for n in channels
            )
        )
        for n in channels:
            await local.wait_stored(f"bench-{n}", 120)
        wall = time.perf_counter() - t0
        assert local.store is not None
        produced = sum(stop.n_samples for _, stop in results)
        stored = sum(local.store.sample_count(f"bench-{n}") for n in channels)
    return produced, stored, wall


async def throughput(profile_path: Path, channels: list[str], hours: float, rounds: int) -> bool:
    rates: dict[str, list[float]] = {"unsigned": [], "signed": []}
    complete = True
    for r in range(rounds):
        for label, security in (("unsigned", None), ("signed", profile_path)):
            produced, stored, wall = await end_to_end(channels, hours, security)
            complete &= produced == stored
            rates[label].append(stored / wall)
            print(
                f"  round {r + 1} {label:8}: {stored} of {produced} samples ({produced / len(channels) / 3600:.1f} h of "
                f"cell time per channel) stored in {wall:.2f} s = {stored / wall:,.0f} samples/s"
            )
    plain, signed = statistics.median(rates["unsigned"]), statistics.median(rates["signed"])
    print(
        f"end to end (median of {rounds}): signed {signed:,.0f} samples/s vs unsigned {plain:,.0f} samples/s "
        f"({signed / plain:.0%} of it)"
    )
    return complete


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--hours", type=float, default=4.0, help="cell hours per step (each run: a cc and a rest)")
    p.add_argument("--rounds", type=int, default=3, help="end-to-end rounds per configuration")
    p.add_argument("--calls", type=int, default=2000, help="calls per micro-benchmark round")
    a = p.parse_args()
    t0 = time.perf_counter()
    channels = [f"ch{i:02d}" for i in range(a.channels)]
    with tempfile.TemporaryDirectory(prefix="labtwin-bench-signing-") as tmp:
        profile_path = write_profile(Path(tmp), channels)
        micro(profile_path, a.calls, 5)
        print(
            f"end to end: {a.channels} simulated channels at max speed, each a cc to 3.6 V (at most {a.hours:g} h) "
            f"and a {a.hours:g} h rest,"
        )
        print("  1 s sampling, agents -> embedded broker -> recorder -> SQLite (no TLS: signing alone)")
        complete = asyncio.run(throughput(profile_path, channels, a.hours, a.rounds))
    print(f"bench wall time {time.perf_counter() - t0:.1f} s")
    if not complete:
        print("some samples were not stored")
        sys.exit(1)


if __name__ == "__main__":
    main()
