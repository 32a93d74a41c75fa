"""The live view shows the twin's cells and its anomalies next to the channels."""

from rich.console import Console

from labtwin.cli.monitor import MonitorView
from labtwin.documents import Anomaly, CellState, ChannelState, ChannelStatus


def test_monitor_view_shows_channels_twin_states_and_anomalies():
    view = MonitorView()
    view.absorb("t", ChannelStatus(channel="ch1", state=ChannelState.paused, run_id="r1", voltage_V=1.52))
    view.absorb(
        "t",
        CellState(
            cell="LTO-bare-01",
            model="lto-thin-film",
            cycle=1,
            soc=0.42,
            voltage_V=1.5212,
            predicted_voltage_V=1.5209,
            anomalies=1,
        ),
    )
    view.absorb(
        "t",
        Anomaly(
            kind="oscillation_onset",
            cell="LTO-bare-01",
            time_s=7300.0,
            action="pause",
            message="voltage oscillation on the plateau: amplitude 0.82 mV",
        ),
    )
    console = Console(record=True, width=200)
    console.print(view.render())
    text = console.export_text()
    assert "paused" in text and "LTO-bare-01" in text and "lto-thin-film" in text and "42%" in text
    assert "ANOMALY oscillation_onset on LTO-bare-01 (pause)" in text


def test_monitor_view_shows_a_refused_command_and_who_sent_it():
    from labtwin.documents import SecurityEvent

    view = MonitorView()
    view.absorb(
        "t",
        SecurityEvent(lab="demo", channel="ch1", topic="labtwin/v1/demo/ch1/cmd", sender="viewer", reason="may not"),
    )
    console = Console(record=True, width=200)
    console.print(view.render())
    assert "SECURITY ch1 refused a command from viewer: may not" in console.export_text()
