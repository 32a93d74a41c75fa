"""Simulated potentiostats with the drivers' interface, backed by labtwin's physics,
and the library of simulated cells (one parameter file per seed system)."""
