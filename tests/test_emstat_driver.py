"""The PalmSens EmStat MethodSCRIPT driver: script and packet format, a transcript, and the driver over
pyserial's socket:// URL against the wire-level emulator (CV, EIS, abort, errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from labtwin.devices.methodscript import MethodScriptFormatError, decode_packet, encode_variable, literal, parse_literal
from labtwin.devices.potentiostat import RunsTechniques
from labtwin.documents import EisSettings, EndConditions, StepCommand, StepKind, SweepSettings
from labtwin.instruments.emstat import EmStat
from labtwin.instruments.transcript import ScriptedLineTransport, TranscriptMismatch
from labtwin.instruments.transport import InstrumentError, SerialLineTransport
from labtwin.physics.library import load_cell
from labtwin.simulators.emstat import EmStatEmulator, EmStatThread


def test_literals_are_exact_integers_with_si_prefixes_and_never_rounded():
    assert [literal(v) for v in (0.5, -0.5, 0.0251, 100e3, 1.5, 0.002, 0)] == [
        "500m",
        "-500m",
        "25100u",
        "100k",
        "1500m",
        "2m",
        "0",
    ]
    assert literal(41, integer=True) == "41i"
    assert parse_literal("-1200u") == pytest.approx(-1.2e-3) and parse_literal("11i") == 11
    with pytest.raises(MethodScriptFormatError):
        parse_literal("1.5")  # MethodSCRIPT has no decimal point
    with pytest.raises(MethodScriptFormatError):
        literal(math.nan)


def test_data_packages_decode_as_the_manual_describes():
    # 0x8000800 - 2**27 = 2048, prefix u: 2.048 mA; the published example form, with metadata after a comma
    (current,) = decode_packet("Pba8000800u,14,20B")
    assert current.var_type == "ba" and current.value == pytest.approx(2.048e-3)
    for value in (1.234567, -3.2e-9, 0.0, 1.0e5):
        (v,) = decode_packet("P" + encode_variable("da", value))
        assert v.value == pytest.approx(value, rel=1e-6, abs=1e-15)
    assert math.isnan(decode_packet("Pda     nan")[0].value)
    with pytest.raises(MethodScriptFormatError):
        decode_packet("Pzz12")


CV = StepCommand(
    run_id="r",
    step_index=0,
    step=StepKind.cyclic_voltammetry,
    end=EndConditions(time_s=60),
    sample_interval_s=0.01,
    sweep=SweepSettings(start_V=1.3, vertex_1_V=1.8, vertex_2_V=1.3, scan_rate_V_s=0.1, step_V=0.005),
)


def test_a_cv_is_the_exact_script_and_its_packages_become_readings():
    script = [
        "var t",
        "var p",
        "var c",
        "set_pgstat_chan 0",
        "set_pgstat_mode 2",
        "set_range ba 100u",
        "set_autoranging ba 100n 5m",
        "set_range_minmax da 1300m 1800m",
        "set_e 1300m",
        "cell_on",
        "timer_start",
        "meas_loop_cv p c 1300m 1800m 1300m 5m 100m",
        "  timer_get t",
        "  pck_start",
        "  pck_add t",
        "  pck_add p",
        "  pck_add c",
        "  pck_end",
        "endloop",
        "on_finished:",
        "  cell_off",
    ]
    packet = "P" + ";".join([encode_variable("eb", 0.05), encode_variable("da", 1.305), encode_variable("ba", 2e-6)])
    t = ScriptedLineTransport(
        [
            (">", "t"),
            ("<", "tes4_lr1.3"),
            ("<", "#build*"),
            (">", "e"),
            *((">", line) for line in script),
            (">", ""),
            ("<", "e"),
            ("<", "M0000"),
            ("<", packet),
            ("<", "*"),
            ("<", ""),
        ]
    )
    d = EmStat(t)
    assert isinstance(d, RunsTechniques) and d.supports(StepKind.cyclic_voltammetry) and not d.supports(StepKind.gitt)
    readings = list(d.run_technique(CV))
    assert [(r.time_s, r.voltage_V, r.current_A) for r in readings] == [
        (pytest.approx(0.05), pytest.approx(1.305), pytest.approx(2e-6))
    ]
    t.assert_done()


def test_the_transcript_fails_on_a_wrong_script_line():
    t = ScriptedLineTransport([(">", "t"), ("<", "tes4_lr1.3"), ("<", "#build*"), (">", "e"), (">", "var x")])
    d = EmStat(t)
    with pytest.raises(TranscriptMismatch, match="var t"):
        list(d.run_technique(CV))


def test_out_of_range_settings_raise_before_anything_is_sent():
    t = ScriptedLineTransport([(">", "t"), ("<", "tes4_lr1.3"), ("<", "#build*")])
    d = EmStat(t)
    cc = StepCommand(run_id="r", step_index=0, step=StepKind.cc, current_A=0.5, end=EndConditions(time_s=10))
    with pytest.raises(ValueError, match=r"current_A = 0.5 A is outside the EmStat's range"):
        list(d.run_technique(cc))
    t.assert_done()


@pytest.fixture()
def emstat():
    emulator = EmStatEmulator(load_cell("lfp"), speed=20.0, seed=2)
    with EmStatThread(emulator) as running:
        driver = EmStat(SerialLineTransport(f"socket://127.0.0.1:{running.port}", timeout_s=2.0))
        yield emulator, driver
        driver.transport.close()


def test_cv_eis_and_rest_run_on_the_emulated_device(emstat):
    emulator, d = emstat
    assert d.firmware.startswith("es4_lr")
    rest = StepCommand(run_id="r", step_index=0, step=StepKind.rest, end=EndConditions(time_s=20), sample_interval_s=2)
    ocv = list(d.run_technique(rest))
    assert len(ocv) == 10 and all(r.current_A == 0 for r in ocv) and 2.5 < ocv[-1].voltage_V < 4.0
    e0 = ocv[-1].voltage_V
    sweep = SweepSettings(start_V=e0, vertex_1_V=e0 + 0.15, vertex_2_V=e0 - 0.15, scan_rate_V_s=0.05, step_V=0.002)
    cv = StepCommand(
        run_id="r", step_index=1, step=StepKind.cyclic_voltammetry, sweep=sweep, end=EndConditions(time_s=100)
    )
    points = list(d.run_technique(cv))
    assert len(points) == len(sweep.potentials_V()) == len(emulator.packets_sent) - 10
    current = np.array([p.current_A for p in points])
    assert current.max() > 0 > current.min()  # oxidation and reduction both flow
    assert np.all(np.diff([p.time_s for p in points]) > 0)  # the device's timer
    eis = StepCommand(
        run_id="r",
        step_index=2,
        step=StepKind.eis,
        end=EndConditions(time_s=1000),
        eis=EisSettings(f_start_Hz=1e4, f_end_Hz=0.1, points_per_decade=4),
    )
    spectrum = list(d.run_technique(eis))
    assert [p.frequency_Hz for p in spectrum] == pytest.approx(eis.eis.frequencies_Hz(), rel=1e-6)
    assert all(p.z_real_ohm > 0 and p.z_imag_ohm < 0 for p in spectrum)
    assert abs(spectrum[0].voltage_V - e0) < 0.05  # measured at the open-circuit potential


def test_abort_stops_the_script_and_output_off_is_confirmed(emstat):
    emulator, d = emstat
    ca = StepCommand(
        run_id="r", step_index=0, step=StepKind.cv, voltage_V=3.4, end=EndConditions(time_s=3600), sample_interval_s=1
    )
    readings = d.run_technique(ca)
    first = [next(readings) for _ in range(5)]
    assert all(abs(r.voltage_V - 3.4) < 1e-9 for r in first)
    readings.close()  # the agent's end condition: the driver aborts and waits for the script's end
    assert not d._running and emulator.cell_on is False
    d.output_off()
    assert emulator.scripts[-1] == ["cell_off"]


def test_a_script_the_device_rejects_raises_with_the_devices_error(emstat):
    emulator, d = emstat
    gitt = StepCommand(
        run_id="r",
        step_index=0,
        step=StepKind.gitt,
        current_A=1e-4,
        end=EndConditions(time_s=100),
        gitt={"pulse_s": 10, "relax_s": 10},
    )
    assert not d.supports(StepKind.gitt)
    with pytest.raises(InstrumentError, match="needs a source-measure instrument"):
        d.set_current(1e-4, 4.0)
    d.script = lambda cmd: ["var p", "meas_loop_warp p 1"]  # what a device does with a command it does not know
    with pytest.raises(InstrumentError, match=r"MethodSCRIPT error 0x4004 \(Line 2, Col 1\)"):
        list(d.run_technique(CV))
    del d.script
    assert (
        len(
            list(
                d.run_technique(
                    StepCommand(
                        run_id="r", step_index=1, step=StepKind.rest, end=EndConditions(time_s=4), sample_interval_s=1
                    )
                )
            )
        )
        == 4
    )  # and the next script runs in sync
    assert gitt.step is StepKind.gitt
