"""Benchmarks of Cleanroom FL (scripts that print tables; never timed unit tests)."""
