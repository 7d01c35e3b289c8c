"""``cleanroom attest``: verify, show and simulate attestation evidence.

Exit codes of ``verify``: 0 accepted, 1 rejected, 2 unusable input or usage. Every file the
commands take is read with a hard cap, so a huge or endless input (``/dev/urandom``) is refused
with exit 2 after at most a megabyte.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import json
import sys
from pathlib import Path
from typing import Any

from cleanroom.attestation.abi.amd_cert import MAX_CERT_BYTES
from cleanroom.attestation.evidence import (
    FORMAT_SNP,
    Endorsements,
    detect_format,
    verify_evidence,
)
from cleanroom.attestation.registry import format_for
from cleanroom.attestation.validate.policy import MAX_EVIDENCE_BYTES_LIMIT, Policy, load_policy
from cleanroom.attestation.verdict import Layer, Verdict
from cleanroom.config import read_bounded
from cleanroom.errors import CleanroomError, ConfigError

EXIT_ACCEPTED, EXIT_REJECTED, EXIT_UNUSABLE = 0, 1, 2
MAX_EVIDENCE_FILE = MAX_EVIDENCE_BYTES_LIMIT  # no policy accepts more; the policy's own limit
# (64 KiB by default) is applied by verify_evidence


class UsageError(CleanroomError):
    """Bad command-line usage (exit 2)."""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("attest", help="verify, show and simulate TEE attestation evidence",
                       description="Verify AMD SEV-SNP reports and Intel TDX quotes against "
                       "pinned vendor roots and a policy; show their fields; create a "
                       "simulated root for development.")
    asub = p.add_subparsers(dest="attest_command", required=True, metavar="COMMAND")

    v = asub.add_parser(
        "verify", help="verify evidence (exit 0 accepted, 1 rejected, 2 unusable input)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify an SEV-SNP attestation report or a TDX quote (format detected from "
        "the bytes).\nSignature and chain are checked up to the vendor roots pinned in this "
        "package; certificates\nthat come with the evidence are never trusted. No network "
        "access.\n\nexit status: 0 accepted, 1 rejected, 2 unusable input or usage",
        epilog="examples:\n"
        "  cleanroom attest verify report.bin --vcek vcek.pem --measurement 4a1f...\n"
        "  cleanroom attest verify quote.dat --collateral collateral/ --json\n"
        "  cleanroom attest verify report.bin --vcek vcek.der --policy policy.toml "
        "--at 2025-01-01T00:00:00Z")
    v.add_argument("evidence", type=Path, help="report (1184 bytes) or quote file")
    v.add_argument("--vcek", type=Path, help="VCEK/VLEK certificate, DER or PEM (a bundle "
                   "with ASK/ARK is fine: those are ignored). Required for SEV-SNP.")
    v.add_argument("--policy", type=Path, help="policy file (.toml or .json); defaults: debug "
                   "and migration agent refused, VMPL 0, measurement not checked")
    v.add_argument("--measurement", action="append", default=[], metavar="HEX",
                   help="allowed SNP MEASUREMENT / TDX MRTD (repeatable; replaces the "
                   "policy's list)")
    v.add_argument("--report-data", metavar="HEX", help="expected REPORT_DATA (64 bytes hex)")
    v.add_argument("--allow-debug", action="store_true", help="accept debug enclaves")
    v.add_argument("--at", metavar="ISO8601", help="verification time for certificate and "
                   "collateral validity (default: now)")
    v.add_argument("--collateral", type=Path, metavar="DIR", help="TDX collateral folder "
                   "(tcb_info.json, qe_identity.json, tcb_signing_chain.pem, CRLs)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=cmd_verify)

    s = asub.add_parser("show", help="print every parsed field of a report or quote")
    s.add_argument("evidence", type=Path)
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=cmd_show)

    r = asub.add_parser("simulate-root", help="create a simulated ARK->ASK test chain",
                        description="Create a consortium-local simulated AMD chain (ARK, ASK "
                        "and their keys, mode 0600) for the simulated TEE. Policies trust it "
                        "only with environment='simulation' and simulated_root set.")
    r.add_argument("--out", type=Path, required=True, metavar="DIR")
    r.set_defaults(func=cmd_simulate_root)


def _read(path: Path, what: str, limit: int) -> bytes:
    return read_bounded(path, limit, what=what, error=UsageError)


def parse_time(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _hex(text: str, size: int, what: str) -> str:
    try:
        raw = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise UsageError(f"{what} is not hex: {text!r}") from None
    if len(raw) != size:
        raise UsageError(f"{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw.hex()


def build_policy(args: argparse.Namespace) -> Policy:
    policy = load_policy(args.policy) if args.policy else Policy()
    changes: dict[str, Any] = {}
    if args.measurement:
        changes["measurements"] = [_hex(m, 48, "--measurement") for m in args.measurement]
    if args.report_data:
        changes["report_data"] = _hex(args.report_data, 64, "--report-data")
    if args.allow_debug:
        changes["allow_debug"] = True
    if not changes:
        return policy
    try:
        return policy.with_updates(**changes)
    except Exception as exc:  # noqa: BLE001 - pydantic error -> usage error
        raise ConfigError(f"policy with command-line changes is invalid: {exc}") from None


def exit_code(verdict: Verdict) -> int:
    if verdict.accepted:
        return EXIT_ACCEPTED
    if any(c.layer is Layer.PARSE for c in verdict.failures):
        return EXIT_UNUSABLE
    return EXIT_REJECTED


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        data = _read(args.evidence, "evidence", MAX_EVIDENCE_FILE)
        policy = build_policy(args)
        at = parse_time(args.at) if args.at else None
        vcek = _read(args.vcek, "certificate", MAX_CERT_BYTES) if args.vcek else None
        if args.collateral is not None and not args.collateral.is_dir():
            raise UsageError(f"--collateral {args.collateral} is not a folder")
        if vcek is None:
            try:
                fmt = detect_format(data)
            except CleanroomError:
                fmt = None
            if fmt == FORMAT_SNP:
                raise UsageError("SEV-SNP evidence needs --vcek (the VCEK or VLEK certificate "
                                 "that signed it; get it from the host or AMD KDS)")
    except CleanroomError as exc:
        return _usage_failure(args, str(exc))
    verdict = verify_evidence(data, policy=policy, at=at,
                              endorsements=Endorsements(key_certificate=vcek,
                                                        collateral_dir=args.collateral))
    code = exit_code(verdict)
    if args.json:
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        print(render_verdict(verdict))
    return code


def _usage_failure(args: argparse.Namespace, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"verdict": "rejected", "error": message, "format": None,
                          "reasons": [message], "measurement": None, "report_data": None,
                          "debug": None}, indent=2))
    else:
        print(f"error: {message}", file=sys.stderr)
    return EXIT_UNUSABLE


def render_verdict(verdict: Verdict) -> str:
    lines = [f"verdict: {'ACCEPTED' if verdict.accepted else 'REJECTED'}"
             f" ({verdict.format or 'unknown format'})"]
    if verdict.claims is not None:
        c = verdict.claims
        lines.append(f"measurement: {c.measurement.hex()}")
        lines.append(f"report_data: {c.report_data.hex()}")
        lines.append(f"debug: {c.debug}")
        if c.product:
            lines.append(f"product: {c.product}  signing key: {c.signing_key}")
        if c.root:
            lines.append(f"anchored in: {c.root}{' (SIMULATED)' if c.simulated else ''}")
    lines.append("checks:")
    for check in verdict.checks:
        mark = "ok  " if check.passed else "FAIL"
        lines.append(f"  [{mark}] {check.layer.value:8s} {check.name}: {check.reason}")
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            if f.name == "raw" and isinstance(getattr(value, f.name), bytes):
                continue
            out[f.name] = _plain(getattr(value, f.name))
        for name in ("describe",):
            if hasattr(value, name):
                out["decoded"] = value.describe()
        return out
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, int) and value > 0xFFFF:
        return f"{value:#x}"
    return value


def parse_any(data: bytes) -> tuple[str, Any]:
    """(format name, parsed evidence) of any registered format."""
    fmt = format_for(data)
    return fmt.name, fmt.parse(data)


def _render_tree(value: Any, indent: int = 0) -> list[str]:
    """Indented 'key: value' lines; nested structures get their own block."""
    pad = "  " * indent
    lines: list[str] = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        label = f"[{key}]" if isinstance(key, int) else key
        nested = isinstance(item, dict) or (
            isinstance(item, list) and any(isinstance(x, (dict, list)) for x in item))
        if nested:
            lines.append(f"{pad}{label}:")
            lines.extend(_render_tree(item, indent + 1))
        else:
            lines.append(f"{pad}{label}: {item}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    try:
        data = _read(args.evidence, "evidence", MAX_EVIDENCE_FILE)
        fmt, parsed = parse_any(data)
    except CleanroomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    tree = {"format": fmt, "size": len(data), **_plain(parsed)}
    if fmt == FORMAT_SNP:
        from cleanroom.attestation.abi.snp import Product

        product = parsed.product_hint or Product.MILAN
        tree["tcb_decoded_as"] = product.value + ("" if parsed.product_hint else
                                                  " (assumed: version 2 has no CPUID)")
        for which in ("current", "reported", "committed", "launch"):
            tree[f"{which}_tcb"] = str(parsed.tcb(which, product))
    if args.json:
        print(json.dumps(tree, indent=2, default=str))
    else:
        print("\n".join(_render_tree(tree)))
    return 0


def cmd_simulate_root(args: argparse.Namespace) -> int:
    from cleanroom.attestation.simulated import create_simulated_root
    from cleanroom.attestation.trust import fingerprint

    root = create_simulated_root(args.out)
    print(f"simulated ARK {fingerprint(root.ark)[:16]}... and ASK written to {args.out}")
    print(f"  trust it in a simulation policy with: simulated_root = \"{root.bundle_path}\"")
    print("  private keys are mode 0600; never use this root in production")
    return 0
