"""Drivers for real instruments: thin classes over pyvisa / pyserial that implement labtwin.devices' protocols."""
