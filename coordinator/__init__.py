"""The coordinator: the consortium's side (attestation gate, confidential strategy, runs, audit,
tracking, reports, provisioning, daemon and API)."""
