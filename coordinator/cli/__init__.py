"""Command-line entry points of the coordinator: daemon, provisioning, runs, audit."""
