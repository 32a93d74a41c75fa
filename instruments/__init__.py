"""Drivers for real potentiostats: thin classes over pyvisa / pyserial (issue: real instruments).

Holds the default lab configuration (lab.yaml) the CLI uses when no --lab is given.
"""
from pathlib import Path

DEFAULT_LAB_FILE = Path(__file__).parent / "lab.yaml"
