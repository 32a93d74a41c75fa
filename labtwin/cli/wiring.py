"""The one place that wires labtwin's core to concrete drivers, simulators and flows.

DESIGN.md's layering: labtwin's core knows nothing of instruments/,
simulators/ or protocols/; the CLI builds channels from the lab configuration
and hands the core only the Potentiostat protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from labtwin.agent.service import Agent
from labtwin.bus.broker import EmbeddedBroker
from labtwin.config.lab import DEFAULT_LAB_FILE, ChannelConfig, LabConfig, lab_file_from_env, load_lab
from labtwin.data.recorder import Recorder
from labtwin.data.store import Store
from labtwin.devices.clock import Clock, ScaledWallClock, VirtualClock
from labtwin.devices.potentiostat import Potentiostat
from labtwin.documents import RunStart
from labtwin.instruments.transport import AuditTrail
from labtwin.physics.library import load_cell
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.twin.service import TwinService

log = logging.getLogger(__name__)


def default_lab(path: str | Path | None = None) -> LabConfig:
    return load_lab(path if path else lab_file_from_env(DEFAULT_LAB_FILE))


@dataclass
class BuiltChannel:
    name: str
    driver: Potentiostat
    clock: Clock
    cell_id: str
    nominal_capacity_Ah: float | None
    driver_name: str


def build_channel(
    name: str, cfg: ChannelConfig, speed: float | None | str = "config", lab_name: str = "default"
) -> BuiltChannel:
    """A driver and its clock for one channel of the lab file."""
    if cfg.driver == "simulated":
        if not cfg.cell:
            raise ValueError(f"channel {name}: a simulated channel needs `cell:` (a file in simulators/cells)")
        cell = load_cell(cfg.cell)
        clock = VirtualClock(cfg.speed_value if speed == "config" else speed)
        driver = SimulatedPotentiostat(cell, clock, np.random.default_rng(cfg.seed))
        return BuiltChannel(
            name,
            driver,
            clock,
            cfg.cell_id or f"{name}-{cell.name}",
            cell.nominal_capacity_Ah,
            f"simulated:{cell.name}",
        )
    if cfg.driver in REAL_DRIVERS:
        if not cfg.resource:
            raise ValueError(
                f"channel {name}: driver {cfg.driver} needs `resource:` (e.g. TCPIP::192.168.1.20::5025::SOCKET)"
            )
        driver = REAL_DRIVERS[cfg.driver](name, cfg, lab_name)
        # A bench instrument lives on the wall clock; `speed: N` only for an emulator started with --speed N.
        clock = ScaledWallClock(cfg.speed_value or 1.0)
        return BuiltChannel(
            name, driver, clock, cfg.cell_id or f"{name}-{cfg.driver}", cfg.nominal_capacity_Ah, cfg.driver
        )
    raise ValueError(
        f"channel {name}: unknown driver {cfg.driver!r}; choose simulated or one of {', '.join(REAL_DRIVERS)}"
    )


def _audit(name: str, cfg: ChannelConfig, lab_name: str) -> AuditTrail:
    return AuditTrail(cfg.audit or Path("labtwin-data") / "audit" / f"{lab_name}-{name}.jsonl")


def _keithley2450(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.keithley2450 import Keithley2450
    from labtwin.instruments.transport import VisaTransport

    transport = VisaTransport(cfg.resource, timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name))
    ceiling = cfg.limits.voltage_max_V * 1.02 if cfg.limits.voltage_max_V else 5.0
    return Keithley2450(transport, voltage_ceiling_V=ceiling)


def _emstat(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.emstat import EmStat
    from labtwin.instruments.transport import SerialLineTransport

    return EmStat(SerialLineTransport(cfg.resource, timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name)))


def _b2900(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.b2900 import KeysightB2900
    from labtwin.instruments.transport import VisaTransport

    transport = VisaTransport(cfg.resource, timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name))
    ceiling = cfg.limits.voltage_max_V * 1.02 if cfg.limits.voltage_max_V else 5.0
    return KeysightB2900(transport, smu_channel=cfg.smu_channel or 1, voltage_ceiling_V=ceiling)


REAL_DRIVERS = {"keithley2450": _keithley2450, "emstat": _emstat, "b2900": _b2900}


def twin_factory(config: LabConfig, cells: dict[str, str] | None = None, circuit: str | None = None):
    """How the twin service makes a twin for the cell a RunStart names: its model from the lab file.

    The model is the channel's ``twin_model`` (else its simulated ``cell``): a
    parameter file in simulators/cells, the same one a dry-run of that cell uses.
    A channel with neither gets a twin without a model in the loop (cycling,
    impedance and oscillation detectors still run; residual ones do not).
    ``circuit`` overrides the cell's EIS circuit.
    """
    import json

    from labtwin.twin.cell_twin import CellTwin, TwinSettings

    cells = cells or {}

    def make(run: RunStart) -> CellTwin:
        name = None
        if run.channel in config.channels:
            cfg = config.channel(run.channel)
            name = cells.get(run.channel) or cfg.twin_model or cfg.cell
        elif run.channel in cells:
            name = cells[run.channel]
        policy = json.loads(run.metadata.get("anomaly_policy", "{}"))
        if name is None:
            return CellTwin(
                run.cell_id,
                lambda: None,
                "",
                TwinSettings(policy=policy, circuit=circuit or TwinSettings().circuit),
                lab=run.lab,
            )
        definition = load_cell(name)
        settings = TwinSettings(policy=policy, circuit=circuit or definition.eis_circuit)
        return CellTwin(
            run.cell_id,
            definition.build_model,
            definition.name,
            settings,
            lab=run.lab,
            nominal_capacity_Ah=definition.nominal_capacity_Ah,
        )

    return make


@dataclass
class LocalLab:
    """Broker (embedded unless given), agents for some channels and a recorder, in this process."""

    config: LabConfig
    channels: list[str]
    broker_url: str | None = None
    store_url: str | None = None
    speed: float | None | str = "config"
    cells: dict[str, str] = field(default_factory=dict)
    record: bool = True
    twin: bool = False

    async def __aenter__(self) -> LocalLab:
        try:
            return await self._start()
        except BaseException:
            await self.__aexit__(
                None, None, None
            )  # an instrument that cannot be opened must not leave the broker running
            raise

    async def _start(self) -> LocalLab:
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.broker: EmbeddedBroker | None = None
        url = self.broker_url or self.config.broker
        if url is None:
            self.broker = await EmbeddedBroker().start()
            url = self.broker.url
        self.url = url
        self.store = None
        self.recorder = None
        if self.record:
            self.store = Store.open(self.store_url or self.config.store)
            self.recorder = Recorder(url, self.store, self.config.lab, client_id=f"recorder-{self.config.lab}-local")
            self._tasks.append(asyncio.create_task(self.recorder.serve(self._stop)))
            await self._ready(self.recorder.wait_ready())
        self.twin_service = None
        if self.twin:
            self.twin_service = TwinService(
                url, twin_factory(self.config, self.cells), self.config.lab, client_id=f"twin-{self.config.lab}-local"
            )
            self._tasks.append(asyncio.create_task(self.twin_service.serve(self._stop)))
            await self._ready(self.twin_service.wait_ready())
        self.agents: dict[str, Agent] = {}
        for name in self.channels:
            cfg = self.config.channel(name)
            if name in self.cells:
                cfg = cfg.model_copy(update={"cell": self.cells[name], "driver": "simulated", "cell_id": None})
            built = build_channel(name, cfg, self.speed, self.config.lab)
            agent = Agent(
                lab=self.config.lab,
                channel=name,
                driver=built.driver,
                clock=built.clock,
                broker_url=url,
                channel_limits=cfg.limits,
                cell_id=built.cell_id,
                nominal_capacity_Ah=built.nominal_capacity_Ah,
                driver_name=built.driver_name,
            )
            self.agents[name] = agent
            self._tasks.append(asyncio.create_task(agent.serve(self._stop)))
            await self._ready(agent.wait_ready())
        return self

    async def _ready(self, awaitable) -> None:
        waiter = asyncio.ensure_future(awaitable)
        done, _ = await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception():
                waiter.cancel()
                raise task.exception()
        await waiter

    async def wait_stored(self, run_id: str, timeout_s: float = 60.0) -> None:
        if self.recorder is not None:
            await self.recorder.wait_stored(run_id, timeout_s)

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
        if getattr(self, "broker", None) is not None:
            await self.broker.stop()
        if getattr(self, "store", None) is not None:
            self.store.close()
