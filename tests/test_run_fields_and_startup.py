"""Typed run fields instead of JSON in metadata, a named resume-check range, and no environment change at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from labtwin import bus as busmod
from labtwin.bus import Bus
from labtwin.bus.broker import EmbeddedBroker
from labtwin.cli.wiring import LocalLab
from labtwin.documents import RunStart, StartRun, StepEvent, StepKind, StopRun
from labtwin.documents.codec import decode, encode
from labtwin.orchestration.prefect_env import use_prefect_defaults
from labtwin.twin.cell_twin import CellTwin
from labtwin.twin.service import TwinService
from tests.helpers import sim_lab, wait_doc

REPO = Path(__file__).resolve().parents[1]


def _start(**fields: object) -> StartRun:
    return StartRun(run_id="r", channel="ch", cell_id="c", protocol="p", n_steps=1, **fields)


# ---------------------------------------------------------------------- the anomaly policy, a typed field


def test_the_anomaly_policy_is_a_typed_field_that_survives_the_wire_and_refuses_what_no_twin_knows() -> None:
    start = _start(anomaly_policy={"soft_short": "stop", "oscillation_onset": "pause"})
    again = decode(busmod.topic("lab", "ch", "cmd"), encode(start))
    assert isinstance(again, StartRun) and again.anomaly_policy == {"soft_short": "stop", "oscillation_onset": "pause"}
    assert "anomaly_policy" not in again.metadata
    with pytest.raises(ValidationError):
        _start(anomaly_policy={"soft_shorts": "stop"})  # a misspelt kind
    with pytest.raises(ValidationError):
        _start(anomaly_policy={"soft_short": "explode"})


async def test_the_agent_carries_the_policy_from_start_run_to_run_start(
    embedded_broker: EmbeddedBroker, unique_lab: str, tmp_path: Path
) -> None:
    lab = sim_lab(unique_lab, {"ch": "lto_bare_thinfilm"})
    async with LocalLab(lab, ["ch"], embedded_broker.url, str(tmp_path / "s.db"), record=False) as local:
        async with Bus(local.url) as bus:
            sub = await bus.subscribe(busmod.topic(unique_lab, "ch", "event"))
            cmd = busmod.topic(unique_lab, "ch", "cmd")
            await bus.publish(cmd, _start(anomaly_policy={"capacity_fade": "pause"}))
            started = await wait_doc(sub, lambda d: isinstance(d, RunStart))
            await bus.publish(cmd, StopRun(run_id="r"))
    assert started.anomaly_policy == {"capacity_fade": "pause"}


def _run_start(run_id: str, policy: dict[str, str]) -> RunStart:
    return RunStart(
        run_id=run_id,
        lab="lab",
        channel="ch",
        cell_id="cell-1",
        protocol="p",
        n_steps=1,
        anomaly_policy=policy,
    )


def test_the_twin_service_takes_each_runs_own_policy_even_when_the_cells_twin_outlives_a_run() -> None:
    made: list[CellTwin] = []

    def factory(run: RunStart) -> CellTwin:
        made.append(CellTwin(run.cell_id, lambda: None))
        return made[-1]

    service = TwinService("mqtt://127.0.0.1:1", factory, lab="lab")
    service._handle([_run_start("first", {"oscillation_onset": "stop"})])
    assert made[0].settings.policy == {"oscillation_onset": "stop"}
    end = StepEvent(run_id="first", channel="ch", step_index=0, step=StepKind.rest, event="ended", time_s=1.0)
    service._handle([end])
    service._handle([_run_start("second", {"capacity_fade": "pause"})])  # same cell, same twin, its next run
    assert len(made) == 1
    assert made[0].settings.policy == {"capacity_fade": "pause"}


# ---------------------------------------------------------------------- the resume checks' own index range


def test_resume_checks_have_their_own_index_range_and_a_second_resume_measures_again() -> None:
    from labtwin.documents import EndConditions, StepCommand
    from labtwin.orchestration.flows import (
        RESUME_CHECKS_FROM,
        check_protocol_step_index,
        is_resume_check,
        next_resume_check_index,
    )

    assert RESUME_CHECKS_FROM < 2**31 - 1  # the store's INTEGER step columns hold it on PostgreSQL too
    assert not is_resume_check(100_000)  # a long protocol's step (the old magic number) is a protocol step
    assert is_resume_check(RESUME_CHECKS_FROM)

    def ended(index: int) -> StepEvent:
        return StepEvent(run_id="r", channel="ch", step_index=index, step=StepKind.rest, event="ended", time_s=0.0)

    assert next_resume_check_index([ended(0), ended(1)]) == RESUME_CHECKS_FROM
    assert next_resume_check_index([ended(0), ended(RESUME_CHECKS_FROM), ended(1)]) == RESUME_CHECKS_FROM + 1
    step = StepCommand(run_id="r", step_index=RESUME_CHECKS_FROM, step=StepKind.rest, end=EndConditions(time_s=1))
    with pytest.raises(ValueError, match="resume checks"):
        check_protocol_step_index(step)


# ---------------------------------------------------------------------- no environment change at import


def test_importing_labtwin_changes_nothing_in_the_environment() -> None:
    code = (
        "import json, os; before = dict(os.environ)\n"
        "import labtwin.cli, labtwin.orchestration.flows, labtwin.orchestration.campaign_flow\n"
        "after = dict(os.environ)\n"
        "print(json.dumps(sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DO_NOT_TRACK"))}
    env["PREFECT_HOME"] = os.environ["PREFECT_HOME"]  # the session's own (conftest), not ~/.prefect
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_prefect_defaults_are_defaults_and_the_ephemeral_ones_only_without_an_api() -> None:
    env: dict[str, str] = {"PREFECT_CLIENT_MAX_RETRIES": "3"}
    use_prefect_defaults(env)
    assert env["PREFECT_CLIENT_MAX_RETRIES"] == "3"  # the user's own value stays
    assert env["DO_NOT_TRACK"] == "1" and env["PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED"] == "false"
    assert "PREFECT_LOGGING_LEVEL" not in env
    served: dict[str, str] = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    use_prefect_defaults(served, quiet_logging=True)
    assert "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED" not in served  # a real server keeps its own services
    assert served["PREFECT_LOGGING_LEVEL"] == "WARNING"
