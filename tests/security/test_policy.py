"""The receiver's rules on their own, on a profile made by `labtwin lab secure`: replays, the last will."""

from __future__ import annotations

import pytest

from labtwin.config.secure_lab import SecuredLab
from labtwin.documents import ChannelState, ChannelStatus, StopRun, encode
from labtwin.security import load_profile, policy
from labtwin.security.policy import Duplicate, Refused, Verifier
from labtwin.security.signing import Signer

CMD = "labtwin/v1/seclab/ch1/cmd"
STATUS = "labtwin/v1/seclab/ch1/status"


@pytest.fixture
def profile(secured_lab: SecuredLab):
    return load_profile(secured_lab.out / "security.yaml")


def _signer(profile, name: str) -> Signer:
    return Signer.from_file(name, profile.identity(name).signing_key)


def test_a_command_seen_again_is_a_resend_at_first_and_a_replay_later(profile, monkeypatch):
    payload = _signer(profile, "operator").seal(CMD, encode(StopRun(run_id="r", exit_status="aborted")))
    verifier = Verifier(profile)
    verifier.check(CMD, payload)
    with pytest.raises(Duplicate):
        verifier.check(CMD, payload)  # QoS 1 redelivery, or the publisher's resend after a reconnect
    monkeypatch.setattr(policy, "RESEND_WINDOW_NS", -1)
    with pytest.raises(Refused, match="replayed command from 'operator'"):
        verifier.check(CMD, payload)


def test_the_seen_commands_survive_a_restart_of_the_receiver(profile, tmp_path, monkeypatch):
    """An agent that restarts keeps the window's nonces on disk: a captured command stays refused."""
    state = tmp_path / "agent-ch1-commands.json"
    payload = _signer(profile, "orchestrator").seal(CMD, encode(StopRun(run_id="r", exit_status="aborted")))
    Verifier(profile, state).check(CMD, payload)
    monkeypatch.setattr(policy, "RESEND_WINDOW_NS", -1)
    with pytest.raises(Refused, match="replayed"):
        Verifier(profile, state).check(CMD, payload)
    state.write_text("not json")
    with pytest.raises(Refused, match="stale"):  # unreadable state: nothing signed before now is taken
        Verifier(profile, state).check(CMD, payload)


def test_the_last_will_is_taken_although_signed_before_later_statuses(profile):
    agent = _signer(profile, "agent-ch1")
    will = agent.seal(STATUS, encode(ChannelStatus(channel="ch1", state=ChannelState.offline)))
    idle = agent.seal(STATUS, encode(ChannelStatus(channel="ch1", state=ChannelState.idle)))
    running = agent.seal(STATUS, encode(ChannelStatus(channel="ch1", state=ChannelState.running)))
    verifier = Verifier(profile)
    for payload in (idle, running):
        trusted = verifier.check(STATUS, payload)
        verifier.admit(STATUS, trusted, ChannelStatus.model_validate_json(trusted.body))
    trusted = verifier.check(STATUS, will)
    verifier.admit(STATUS, trusted, ChannelStatus(channel="ch1", state=ChannelState.offline))  # not a replay
    trusted = verifier.check(STATUS, idle)
    with pytest.raises(Refused, match="replayed status"):
        verifier.admit(STATUS, trusted, ChannelStatus(channel="ch1", state=ChannelState.idle))


def test_a_password_is_never_sent_in_clear_beyond_loopback(monkeypatch):
    from labtwin.security import SecurityProfileError, resolve_transport

    with pytest.raises(SecurityProfileError, match="mqtts://"):
        resolve_transport("mqtt://u:secret@10.1.2.3:1883")
    assert resolve_transport("mqtt://u:secret@127.0.0.1:1883").password == "secret"
    monkeypatch.setenv("LABTWIN_INSECURE_BROKER", "1")
    assert resolve_transport("mqtt://u:secret@10.1.2.3:1883").password == "secret"
