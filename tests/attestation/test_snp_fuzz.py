"""Property-based fuzzing of the SEV-SNP parser and of the whole verifier on real reports."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cleanroom.attestation.abi import snp as abi
from cleanroom.attestation.evidence import Endorsements, verify_evidence
from cleanroom.attestation.validate.policy import Policy
from cleanroom.errors import ParseError

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
REAL = [e for e in json.loads((VECTORS / "manifest.json").read_text())
        if e["format"] == "sev-snp" and e["signature_verifies"]]
REPORTS = [(VECTORS / e["file"]).read_bytes() for e in REAL]
CERTS = [(VECTORS / e["cert"]).read_bytes() for e in REAL]
AT = [dt.datetime.fromisoformat(e["verify_at"].replace("Z", "+00:00")) for e in REAL]


def parse_or_typed(data: bytes) -> None:
    with contextlib.suppress(ParseError):
        abi.parse_report(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=2 * abi.REPORT_SIZE))
def test_random_bytes_only_typed_errors(data):
    parse_or_typed(data)


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=abi.REPORT_SIZE, max_size=abi.REPORT_SIZE))
def test_random_reports_of_the_right_size_only_typed_errors(data):
    parse_or_typed(data)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(REAL) - 1),
       edits=st.lists(st.tuples(st.integers(0, abi.REPORT_SIZE - 1), st.integers(0, 255)),
                      min_size=1, max_size=8),
       cut=st.one_of(st.none(), st.integers(0, abi.REPORT_SIZE + 8)))
def test_mutated_real_reports_never_raise_and_never_verify(index, edits, cut):
    buf = bytearray(REPORTS[index])
    for offset, value in edits:
        buf[offset] = value
    if cut is not None:
        buf = buf[:cut] + bytes(max(0, cut - len(buf)))
    data = bytes(buf)
    parse_or_typed(data)
    verdict = verify_evidence(data, policy=Policy(vmpl=None), at=AT[index],
                              endorsements=Endorsements(CERTS[index]))
    changed_signed = data[:abi.SIGNED_LENGTH] != REPORTS[index][:abi.SIGNED_LENGTH]
    changed_sig = data[abi.OFF_SIGNATURE:abi.OFF_SIGNATURE + 144] != \
        REPORTS[index][abi.OFF_SIGNATURE:abi.OFF_SIGNATURE + 144]
    if len(data) != abi.REPORT_SIZE or changed_signed or changed_sig:
        assert not verdict.accepted
