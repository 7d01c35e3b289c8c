"""Short runs of the protocol fuzz targets (the long runs: python -m cleanroom.protocol.fuzz)."""

from __future__ import annotations

import pytest

from cleanroom.protocol import fuzz


@pytest.mark.parametrize(("target", "runs"), [("arrays", 3000), ("wire", 3000),
                                              ("envelope", 400)])
def test_short_fuzz_run_finds_nothing(target, runs):
    result = fuzz.run(target, runs=runs, seed=1)
    assert result.finding is None, (result.error, result.finding)
    assert result.execs == runs


def test_seeds_are_accepted_by_their_targets():
    """The driver starts from valid inputs (so mutations explore past the first checks)."""
    from cleanroom.protocol.arrays import decode_arrays

    for blob in fuzz.seeds("arrays"):
        decode_arrays(blob)
    f = fuzz._fixture()
    from cleanroom.protocol.envelope import open_envelope

    opened = open_envelope(f.payload, f.wrapped, f.recipient, f.context,
                           expected_signer=f.signer.public_key())
    assert opened.metadata == {"num-examples": 10}


def test_envelope_target_reports_a_tampered_envelope_that_opens(monkeypatch):
    """The target's own assertion can fail: make opening accept anything and mutate."""
    monkeypatch.setattr(fuzz, "open_envelope", lambda *a, **k: None)
    with pytest.raises(AssertionError, match="tampered envelope opened"):
        fuzz.fuzz_envelope(b"\x02" + fuzz.PATCH.pack(100, 1))


def test_driver_reports_untyped_errors(monkeypatch):
    def boom(data: bytes) -> None:
        raise ValueError("untyped")

    monkeypatch.setitem(fuzz.TARGETS, "arrays", boom)
    result = fuzz.run("arrays", runs=5)
    assert result.finding is not None and result.error == "ValueError: untyped"
