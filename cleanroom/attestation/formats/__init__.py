"""The built-in TEE formats, one registration each (see :mod:`cleanroom.attestation.registry`)."""
