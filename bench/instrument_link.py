"""How fast the real drivers talk to their emulators: readings per second through the full driver stack.

Keithley 2450 and Keysight B2900 through pyvisa-py over a raw TCP socket (and
the 2450 over pyvisa-py's serial session, ASRLsocket://), the EmStat's
MethodSCRIPT packets through pyserial socket://. A bench instrument is slower
than its emulator (a 2450 at 1 NPLC integrates 16.7-20 ms per reading): these
figures bound labtwin's side of the link, i.e. the sampling interval below
which the driver, not the instrument, would be the limit.

    python bench/instrument_link.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labtwin.documents import EndConditions, StepCommand, StepKind  # noqa: E402
from labtwin.instruments.b2900 import KeysightB2900  # noqa: E402
from labtwin.instruments.emstat import EmStat  # noqa: E402
from labtwin.instruments.keithley2450 import Keithley2450  # noqa: E402
from labtwin.instruments.transport import SerialLineTransport, VisaTransport  # noqa: E402
from labtwin.physics.library import load_cell  # noqa: E402
from labtwin.simulators.b2900 import KeysightB2900Emulator  # noqa: E402
from labtwin.simulators.emstat import EmStatEmulator, EmStatThread  # noqa: E402
from labtwin.simulators.keithley2450 import Keithley2450Emulator  # noqa: E402
from labtwin.simulators.scpi_server import ScpiEmulatorThread  # noqa: E402

N = 2000


def smu_reads_per_s(emulator, driver_cls, address_format: str) -> float:
    with ScpiEmulatorThread(emulator) as running:
        driver = driver_cls(
            VisaTransport(address_format.format(port=running.port), timeout_s=2.0), voltage_ceiling_V=3.0
        )
        driver.set_current(-1e-5, 1.0)
        start = time.perf_counter()
        for _ in range(N):
            driver.read()
        elapsed = time.perf_counter() - start
        driver.close()
    return N / elapsed


def emstat_packets_per_s() -> float:
    emulator = EmStatEmulator(
        load_cell("lto_bare_thinfilm"), speed=1e5, seed=1
    )  # pacing far above what the link carries
    with EmStatThread(emulator) as running:
        driver = EmStat(SerialLineTransport(f"socket://127.0.0.1:{running.port}", timeout_s=2.0))
        rest = StepCommand(
            run_id="bench", step_index=0, step=StepKind.rest, end=EndConditions(time_s=20000), sample_interval_s=1.0
        )
        start = time.perf_counter()
        n = sum(1 for _ in driver.run_technique(rest))
        elapsed = time.perf_counter() - start
        driver.close()
    return n / elapsed


def main() -> None:
    cell = load_cell("lto_bare_thinfilm")
    k_socket = smu_reads_per_s(
        Keithley2450Emulator(cell, speed=100.0), Keithley2450, "TCPIP::127.0.0.1::{port}::SOCKET"
    )
    k_serial = smu_reads_per_s(
        Keithley2450Emulator(cell, speed=100.0), Keithley2450, "ASRLsocket://127.0.0.1:{port}::INSTR"
    )
    b_socket = smu_reads_per_s(
        KeysightB2900Emulator(cell, speed=100.0), KeysightB2900, "TCPIP::127.0.0.1::{port}::SOCKET"
    )
    emstat = emstat_packets_per_s()
    print(f"Keithley 2450, pyvisa-py TCPIP SOCKET:  {k_socket:7.0f} readings/s ({1e3 / k_socket:.2f} ms each)")
    print(f"Keithley 2450, pyvisa-py ASRLsocket://: {k_serial:7.0f} readings/s ({1e3 / k_serial:.2f} ms each)")
    print(f"Keysight B2900, pyvisa-py TCPIP SOCKET: {b_socket:7.0f} readings/s ({1e3 / b_socket:.2f} ms each)")
    print(
        f"EmStat MethodSCRIPT, pyserial socket:// {emstat:7.0f} packets/s (emulator paced at 1e5x: the driver and link are the limit)"
    )


if __name__ == "__main__":
    main()
