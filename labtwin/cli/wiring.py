"""The one place that wires labtwin's core to concrete drivers, simulators and flows.

The layering (docs/architecture.md): the agent, bus, twin and store know no
concrete driver or simulator; the CLI builds channels from the lab configuration
and hands the agent only the Potentiostat protocol. The checks a command makes
before Prefect starts (the protocol, the cell file, the channel's agent) live
here too, so they read the files exactly as the run will.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from labtwin.agent.service import Agent
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.errors import UserError, is_store_error, store_error
from labtwin.config.lab import ChannelConfig, LabConfig
from labtwin.config.settings import Settings
from labtwin.data.recorder import Recorder
from labtwin.data.store import Store
from labtwin.devices.clock import Clock, ScaledWallClock, VirtualClock
from labtwin.devices.potentiostat import Potentiostat, voltage_limit_kind
from labtwin.documents import Action, ChannelState, ChannelStatus, Limits, RunStart
from labtwin.instruments.transport import AuditTrail
from labtwin.physics.library import CellDefinition, load_cell
from labtwin.protocols.compile import CompileContext, compile_program
from labtwin.protocols.model import Protocol, load_protocol, resolve_protocol_path
from labtwin.security import BrokerConnection, as_identity
from labtwin.simulators.potentiostat import SimulatedPotentiostat
from labtwin.twin.service import TwinService

log = logging.getLogger(__name__)


def default_lab(path: str | Path | None = None) -> LabConfig:
    """The lab file by the one precedence rule (``--lab``, LABTWIN_LAB, the packaged lab)."""
    return Settings.resolve(lab=path).lab_config


def open_store(url: str | Path | None) -> Store:
    """The store, or one line saying which store cannot be opened or written and how to give another."""
    try:
        return Store.open(url)
    except Exception as exc:
        if is_store_error(exc):
            raise store_error(str(url), exc) from None
        raise


def check_text_file(path: Path, what: str) -> None:
    """A binary file given where YAML belongs is named, not reported as a codec error."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file (byte {exc.start} is not UTF-8): {what} is a YAML file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory: {what} is a YAML file") from None


def check_protocol(
    name_or_path: str, nominal_capacity_Ah: float | None, limits: Limits | None, compile: bool = True
) -> Protocol:
    """Read (and compile, as the run will) a protocol before Prefect starts: its mistakes are one line each.

    ``compile=False`` where the channel's agent holds what compiling needs (an agent on another PC has its
    own lab file; a bench instrument's capacity may come with its agent's status): the flow compiles then.
    """
    check_text_file(resolve_protocol_path(name_or_path), "a protocol")
    protocol = load_protocol(name_or_path)
    if compile:
        compile_program(protocol, CompileContext("check", nominal_capacity_Ah, limits))
    return protocol


def check_cell(name_or_path: str) -> CellDefinition:
    path = Path(name_or_path)
    if path.is_file() or path.is_dir():
        check_text_file(path, "a cell definition")
    return load_cell(name_or_path)


def channel_capacity_Ah(cfg: ChannelConfig) -> float | None:
    """The nominal capacity C-rates use on a channel: the lab file's, else its simulated cell's."""
    if cfg.nominal_capacity_Ah is not None:
        return cfg.nominal_capacity_Ah
    return check_cell(cfg.cell).nominal_capacity_Ah if cfg.cell else None


async def check_channel(
    url: str | BrokerConnection, lab: str, channel: str, timeout_s: float = 5.0, own_run: str | None = None
) -> ChannelStatus:
    """The channel's retained status: an agent serves it and it is free (or holds ``own_run``, the run being
    resumed), or one line saying what is wrong."""
    from labtwin import bus as busmod
    from labtwin.bus import Bus

    async with Bus(as_identity(url, "orchestrator"), f"cli-check-{channel}-{uuid.uuid4().hex[:6]}") as bus:
        sub = await bus.subscribe(busmod.topic(lab, channel, "status"))
        try:
            status = (await sub.get(timeout_s)).document
        except TimeoutError:
            status = None
    if not isinstance(status, ChannelStatus) or status.state is ChannelState.offline:
        raise UserError(
            f"no agent serves channel {channel!r} of lab {lab!r} on {url}: start one there with "
            f"`labtwin agent --channel {channel} --broker {url}`"
        )
    if status.state in (ChannelState.running, ChannelState.paused) and status.run_id and status.run_id != own_run:
        raise UserError(
            f"channel {channel!r} is busy with run {status.run_id} ({status.state.value}): wait until it ends, "
            "or choose another channel"
        )
    return status


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
            raise ValueError(f"channel {name}: a simulated channel needs `cell:` (a file in labtwin/physics/cells)")
        cell = load_cell(cfg.cell)
        clock: Clock = VirtualClock(cfg.speed_value if isinstance(speed, str) else speed)  # "config": the channel's
        driver = SimulatedPotentiostat(cell, clock, np.random.default_rng(cfg.seed), **stand_in_for(cfg))
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


def _voltage_ceiling_V(cfg: ChannelConfig) -> float:
    """An SMU's voltage limit when the current discharges (its limit is a magnitude): just above the channel's."""
    return cfg.limits.voltage_max_V * 1.02 if cfg.limits.voltage_max_V else 5.0


def _driver_class(driver: str) -> type:
    if driver == "keithley2450":
        from labtwin.instruments.keithley2450 import Keithley2450

        return Keithley2450
    if driver == "b2900":
        from labtwin.instruments.b2900 import KeysightB2900

        return KeysightB2900
    from labtwin.instruments.emstat import EmStat

    return EmStat


def stand_in_for(cfg: ChannelConfig) -> dict:
    """What a simulated channel takes of the instrument it stands for (``stands_for``): the kind of its voltage
    limit (a 2450's is a magnitude: no clamp at a discharge's cut-off), the ceiling its driver would set, and its
    fastest reading. Nothing for a channel that stands for no instrument: the simulator's own clamp."""
    if cfg.stands_for is None:
        return {}
    real = _driver_class(cfg.stands_for)
    out: dict = {"voltage_limit_kind": voltage_limit_kind(real), "voltage_ceiling_V": _voltage_ceiling_V(cfg)}
    if getattr(real, "min_read_interval_s", None) is not None:
        out["min_read_interval_s"] = real.min_read_interval_s  # type: ignore[attr-defined]
    return out


def _resource(name: str, cfg: ChannelConfig) -> str:
    if not cfg.resource:
        raise UserError(
            f"channel {name}: driver {cfg.driver} needs `resource:` (e.g. TCPIP::192.168.1.20::5025::SOCKET)"
        )
    return cfg.resource


def _audit(name: str, cfg: ChannelConfig, lab_name: str) -> AuditTrail:
    return AuditTrail(cfg.audit or Path("labtwin-data") / "audit" / f"{lab_name}-{name}.jsonl")


def _keithley2450(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.keithley2450 import Keithley2450
    from labtwin.instruments.transport import VisaTransport

    transport = VisaTransport(_resource(name, cfg), timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name))
    return Keithley2450(transport, voltage_ceiling_V=_voltage_ceiling_V(cfg))


def _emstat(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.emstat import EmStat
    from labtwin.instruments.transport import SerialLineTransport

    return EmStat(SerialLineTransport(_resource(name, cfg), timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name)))


def _b2900(name: str, cfg: ChannelConfig, lab_name: str):
    from labtwin.instruments.b2900 import KeysightB2900
    from labtwin.instruments.transport import VisaTransport

    transport = VisaTransport(_resource(name, cfg), timeout_s=cfg.timeout_s, audit=_audit(name, cfg, lab_name))
    return KeysightB2900(transport, smu_channel=cfg.smu_channel or 1, voltage_ceiling_V=_voltage_ceiling_V(cfg))


REAL_DRIVERS = {"keithley2450": _keithley2450, "emstat": _emstat, "b2900": _b2900}


def twin_factory(config: LabConfig, cells: dict[str, str] | None = None, circuit: str | None = None):
    """How the twin service makes a twin for the cell a RunStart names: its model from the lab file.

    The model is the channel's ``twin_model`` (else its simulated ``cell``): a
    parameter file in labtwin/physics/cells, the same one a dry-run of that cell uses.
    A channel with neither gets a twin without a model in the loop (cycling,
    impedance and oscillation detectors still run; residual ones do not).
    ``circuit`` overrides the cell's EIS circuit.
    """
    from labtwin.twin.cell_twin import CellModel, CellTwin, TwinSettings

    cells = cells or {}

    def make(run: RunStart) -> CellTwin:
        name = None
        if run.channel in config.channels:
            cfg = config.channel(run.channel)
            name = cells.get(run.channel) or cfg.twin_model or cfg.cell
        elif run.channel in cells:
            name = cells[run.channel]
        policy: dict[str, Action] = {kind: action for kind, action in run.anomaly_policy.items()}
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
        # PhysicsCell and EcmCell serve as CellModels at run time; mypy does not match their union to the protocol.
        build_model = cast("Callable[[], CellModel | None]", definition.build_model)
        return CellTwin(
            run.cell_id,
            build_model,
            definition.name,
            settings,
            lab=run.lab,
            nominal_capacity_Ah=definition.nominal_capacity_Ah,
        )

    return make


@dataclass
class LocalLab:
    """Broker (embedded unless given), agents for some channels and a recorder, in this process.

    ``broker_url`` and ``store_url`` are the resolved settings (``Settings``); the lab file's own lines
    have had their say there, so this does not read them again.
    """

    config: LabConfig
    channels: list[str]
    broker_url: str | BrokerConnection | None = None
    store_url: str | None = None
    speed: float | None | str = "config"
    cells: dict[str, str] = field(default_factory=dict)
    record: bool = True
    twin: bool = False
    security: Path | None = None  # the lab's security profile, for an embedded broker (a given one carries its own)

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
        url = self.broker_url  # resolved by Settings; None: an embedded broker here
        if url is None:
            self.broker = await EmbeddedBroker().start()
            url = BrokerConnection.parse(self.broker.url, self.security)
        self.url = BrokerConnection.parse(url)
        self.store = None
        self.recorder = None
        if self.record:
            self.store = open_store(self.store_url)
            self.recorder = Recorder(url, self.store, self.config.lab, client_id=f"recorder-{self.config.lab}-local")
            self._tasks.append(asyncio.create_task(self.recorder.serve(self._stop)))
            await self._ready(self.recorder.wait_ready())
        self.twin_service = None
        progress = None
        if self.twin:
            from labtwin.twin.pacing import FollowProgress

            progress = FollowProgress()  # the simulated channels at max speed wait for the twin (pacing.py)
            self.twin_service = TwinService(
                url,
                twin_factory(self.config, self.cells),
                self.config.lab,
                client_id=f"twin-{self.config.lab}-local",
                progress=progress,
            )
            self._tasks.append(asyncio.create_task(self.twin_service.serve(self._stop)))
            await self._ready(self.twin_service.wait_ready())
        self.agents: dict[str, Agent] = {}
        for name in self.channels:
            cfg = self.config.channel(name)
            if name in self.cells:
                # A real channel simulated: the stand-in behaves as its instrument (compliance, fastest reading).
                stands_for = cfg.driver if cfg.driver != "simulated" else cfg.stands_for
                cfg = cfg.model_copy(
                    update={"cell": self.cells[name], "driver": "simulated", "cell_id": None, "stands_for": stands_for}
                )
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
                spool_dir=self.config.spool_dir,
                pace=progress.wait if progress is not None and built.clock.speed is None else None,
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
        try:
            for task in self._tasks:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 15)
        finally:  # a service that died of its own error still leaves no broker running and no store open
            broker: EmbeddedBroker | None = getattr(self, "broker", None)
            if broker is not None:
                await broker.stop()
            store: Store | None = getattr(self, "store", None)
            if store is not None:
                store.close()
