"""Test oracles: exact computations (full Jacobians, theory) the estimators and detectors are checked against.

benchmarks/ imports them from here too (calibration uses the same references).
"""
