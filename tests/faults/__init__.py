"""Fault-injection harnesses used by the reliability tests and bench/faults.py."""
