"""Analysis of measured (or simulated) data: plain functions on numpy arrays with units in their names."""
