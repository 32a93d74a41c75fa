"""The options every command shares, declared once so each says the same precedence in its help."""

import typer

BrokerOpt = typer.Option(
    None, "--broker", help="mqtt://host:port or mqtts://host:8883 (default: LABTWIN_BROKER, the lab file's broker:)"
)
LabOpt = typer.Option(None, "--lab", help="lab file (default: LABTWIN_LAB, else the packaged demo lab)")
StoreOpt = typer.Option(
    None,
    "--store",
    help="SQLite path or postgresql:// URL (default: LABTWIN_STORE, the lab file's store:, ./labtwin-data/labtwin.db)",
)
SpeedOpt = typer.Option(
    None, "--speed", help="simulated channels: 1 = real time, 1000, or max (default: LABTWIN_SPEED, the channel's)"
)
JsonOpt = typer.Option(False, "--json", help="print results as JSON")
