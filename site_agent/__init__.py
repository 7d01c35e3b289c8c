"""Cleanroom FL site agent: what runs inside each hospital's enclave."""
