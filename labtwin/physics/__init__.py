"""labtwin's simulation core: the physics shared by simulated potentiostats and (later) the twin.

The models here know no parameter values: parameter sets are data (YAML files
under labtwin/physics/cells/, each value with its unit and source), as in PyBaMM.
"""
