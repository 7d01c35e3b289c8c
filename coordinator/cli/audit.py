"""``cleanroom audit``: verify and show the coordinator's signed audit chain."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from cleanroom.errors import CleanroomError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("audit", help="verify or show an audit chain (audit.jsonl)",
                       description="The coordinator writes one signed, hash-chained entry per "
                       "event (run start, a receipt per round, run end).")
    asub = p.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    v = asub.add_parser("verify", help="exit 0 if intact, 1 naming the first bad entry",
                        description="Check every signature (by the coordinator's key you give),"
                        " sequence number and hash link. Exit 0 intact, 1 tampered (the first "
                        "bad entry is named), 2 unusable input or no --key (a chain re-signed "
                        "by someone else is consistent too: only the expected key proves who "
                        "wrote it).",
                        epilog="example: cleanroom audit verify results/audit.jsonl --key "
                        "fed/coordinator/audit_public_key.hex --head HEX")
    v.add_argument("path", type=Path)
    v.add_argument("--key", help="the coordinator's public key, from a channel you trust (the "
                   "provisioning folder's coordinator/audit_public_key.hex): PEM file, or raw "
                   "hex (file or string). Required for exit 0.")
    v.add_argument("--head", help="expected head hash (e.g. the MLflow tag audit_head): "
                   "catches entries removed from the end; without it truncation cannot be "
                   "detected")
    v.add_argument("--json", action="store_true", help="print the result as one JSON object")
    v.set_defaults(func=cmd_verify)
    s = asub.add_parser("show", help="print the entries readably")
    s.add_argument("path", type=Path)
    s.add_argument("--json", action="store_true", help="one JSON object per entry")
    s.set_defaults(func=cmd_show)


NO_HEAD = "no head given: truncation not detectable (pass --head)"
NO_KEY = ("no --key given: the chain is consistent with the key it names itself, which a "
          "forger re-signing the chain would name too; authorship not verified")


def cmd_verify(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.audit import load_public_key, verify_chain

    key = load_public_key(args.key) if args.key else None
    if not args.path.exists():
        raise CleanroomError(f"{args.path}: file not found")
    result = verify_chain(args.path, public_key=key, expected_head=args.head)
    warnings = [w for w, missing in ((NO_KEY, key is None), (NO_HEAD, args.head is None))
                if missing]
    code = (1 if not result.ok else 2 if key is None else 0)
    if args.json:
        print(json.dumps({"ok": result.ok and key is not None, "consistent": result.ok,
                          "entries": result.entries, "head": result.head,
                          "first_bad_entry": result.first_bad, "reason": result.reason,
                          "public_key": result.public_key, "key_checked": key is not None,
                          "truncation_checked": args.head is not None,
                          "warnings": warnings}, indent=2))
    elif not result.ok:
        print(f"TAMPERED: entry {result.first_bad}: {result.reason}")
    else:
        state = "intact" if key is not None else "consistent, NOT verified"
        print(f"{state}: {result.entries} entries, head {result.head}, signatures by "
              f"{result.public_key}")
        for warning in warnings:
            print(f"warning: {warning}")
    return code


def _describe(entry: dict) -> list[str]:
    when = dt.datetime.fromtimestamp(entry["time"], dt.UTC).isoformat()
    body = entry["body"]
    lines = [f"#{entry.get('seq')} {entry.get('kind')} at {when}"]
    if entry.get("kind") == "round-receipt":
        lines.append(f"  round {body.get('round')}: attested {body.get('attested')}")
        for site, reason in (body.get("quarantined") or {}).items():
            lines.append(f"  quarantined {site}: {reason}")
        for site, s in (body.get("sites") or {}).items():
            eps = s.get("epsilon_run")
            lines.append(f"  {site}: evidence {str(s.get('evidence_sha256'))[:16]} "
                         f"update {str(s.get('update_ciphertext_sha256'))[:16]} "
                         f"eps {eps if eps is None else round(eps, 4)}")
        lines.append(f"  aggregate {body.get('aggregate_sha256')}")
    else:
        for key, value in body.items():
            text = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"  {key}: {text[:200]}")
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    from cleanroom.coordinator.audit import read_entries

    if not args.path.exists():
        raise CleanroomError(f"{args.path}: file not found")
    for entry in read_entries(args.path):
        if args.json:
            print(json.dumps(entry))
        else:
            print("\n".join(_describe(entry)))
    return 0
