"""Fuzzing of the evidence parsers: every input must parse or raise a CleanroomError.

Run: ``python -m benchmarks fuzz [--target snp|tdx|certtable|collateral|all] [--execs N]
[--engine auto|atheris|mutate] [--seed S]``. Prints a table (target, engine, execs, seconds,
execs/s, distinct exception types, crashes) and exits 1 when any input raised an exception that
is not a :class:`cleanroom.errors.CleanroomError` (a crash; the input is saved and named).

Targets, each seeded from the real vectors in ``tests/vectors``:

* ``snp``: SEV-SNP report parser, canonical encoding, TCB decoding for every product;
* ``tdx``: TDX quote parser (v4 and v5 layouts), canonical encoding, PCK SGX extensions;
* ``certtable``: the SNP certificate table of an extended report, and the certificate it yields;
* ``collateral``: Intel PCS collateral (TCB info, QE identity, signing chain, CRLs; the first
  byte of an input picks the document).

Engines: ``atheris`` is coverage-guided (libFuzzer; ``pip install -e .[fuzz]``), one process
per target; ``mutate`` is a built-in structure-aware mutation fuzzer (bit flips, interesting
values at the length and type fields of the seeds, splices, dictionary tokens) that keeps the
inputs that parse or fail in a new way as further seeds. ``auto`` uses atheris when installed.
CI runs the mutate engine for a few thousand inputs per target
(``tests/attestation/test_fuzz_short.py``); the runs of a million are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
TARGETS = ("snp", "tdx", "certtable", "collateral")
MAX_CORPUS = 1024


@dataclass(frozen=True)
class Seed:
    data: bytes
    fields: tuple[tuple[int, int], ...] = ()  # (offset, width) of length/type fields


@dataclass(frozen=True)
class Target:
    name: str
    seeds: tuple[Seed, ...]
    run: Callable[[bytes], object]  # may raise CleanroomError; anything else is a crash
    tokens: tuple[bytes, ...] = ()
    max_len: int = 1 << 16


# --------------------------------------------------------------------------- targets


def _hex_file(path: Path) -> bytes:
    return bytes.fromhex("".join(path.read_text().split()).removeprefix("0x"))


def snp_target() -> Target:
    from cleanroom.attestation.abi import snp as abi

    def run(data: bytes) -> object:
        abi.looks_like_report(data)
        report = abi.parse_report(data)
        abi.canonical_bytes(report)
        report.policy.describe()
        report.platform_info.describe()
        for product in abi.Product:
            report.tcb("reported", product).components()
            report.tcb("launch", product)
        return report.product_hint

    fields = ((abi.OFF_VERSION, 4), (abi.OFF_SIGNATURE_ALGO, 4), (abi.OFF_VMPL, 4),
              (abi.OFF_POLICY, 8), (abi.OFF_SIGNER_INFO, 4), (abi.OFF_CPUID_FAM_ID, 1),
              (abi.OFF_CPUID_MOD_ID, 1), (abi.OFF_REPORTED_TCB, 8))
    files = sorted((VECTORS / "snp").glob("**/*.bin"))
    return Target("snp", tuple(Seed(p.read_bytes(), fields) for p in files), run,
                  max_len=2 * abi.REPORT_SIZE)


def _quote_fields(data: bytes) -> tuple[tuple[int, int], ...]:
    from cleanroom.attestation.abi import tdx as abi

    quote = abi.parse_quote(data)
    sig = quote.signed_length
    cert = sig + 4 + abi.ECDSA_SIGNATURE_SIZE + abi.ATTESTATION_KEY_SIZE
    auth = cert + abi.CERT_DATA_HEADER_SIZE + abi.QE_REPORT_SIZE + abi.ECDSA_SIGNATURE_SIZE
    inner = auth + 2 + len(quote.certification.qe_auth_data)
    out = [(abi.OFF_VERSION, 2), (abi.OFF_ATTESTATION_KEY_TYPE, 2), (abi.OFF_TEE_TYPE, 4),
           (sig, 4), (cert, 2), (cert + 2, 4), (auth, 2), (inner, 2), (inner + 2, 4)]
    if quote.version == abi.QUOTE_VERSION_5:
        out += [(abi.HEADER_SIZE, 2), (abi.HEADER_SIZE + 2, 4)]
    return tuple(out)


def _as_v5(v4: bytes, body_type: int) -> bytes:
    """A v4 quote re-laid as v5 (its signature no longer verifies; the parser does not care)."""
    from cleanroom.attestation.abi import tdx as abi

    quote = abi.parse_quote(v4)
    body = quote.body.raw + (bytes(abi.TD15_BODY_SIZE - abi.TD10_BODY_SIZE)
                             if body_type == abi.BODY_TYPE_TDX15 else b"")
    header = struct.pack("<H", abi.QUOTE_VERSION_5) + quote.raw[2:abi.HEADER_SIZE]
    return header + struct.pack("<HI", body_type, len(body)) + body + \
        quote.raw[quote.signed_length:]


def tdx_target() -> Target:
    from cleanroom.attestation.abi import tdx as abi
    from cleanroom.errors import CertificateError

    def run(data: bytes) -> object:
        abi.looks_like_quote(data)
        quote = abi.parse_quote(data)
        abi.canonical_bytes(quote)
        for cert in quote.certification.pck_chain:
            with contextlib.suppress(CertificateError):
                abi.parse_pck_extensions(cert)
        return quote.trailing_bytes

    quotes = [_hex_file(VECTORS / "tdx" / "dcap-qvl" / name)
              for name in ("quote-from-tappd.hex", "tdx-quote.hex")]
    gcp = json.loads((VECTORS / "tdx" / "teekit" / "tdx-v4-gcp-no-nonce.json").read_text())
    quotes.append(base64.b64decode(gcp["tdx"]["quote"]))
    quotes += [p.read_bytes() for p in sorted((VECTORS / "tdx").glob("*.dat"))]
    quotes += [_as_v5(quotes[0], abi.BODY_TYPE_TDX10), _as_v5(quotes[0], abi.BODY_TYPE_TDX15)]
    tokens = (b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----", b"\n", b"\x00",
              b"====", b"\x05\x00", b"\x06\x00", b"\x81\x00\x00\x00")
    return Target("tdx", tuple(Seed(q, _quote_fields(q)) for q in quotes), run, tokens,
                  max_len=abi.MAX_QUOTE_SIZE + 64)


def certtable_target() -> Target:
    from cleanroom.attestation.abi import snp_cert_table as ct
    from cleanroom.attestation.abi.amd_cert import load_certificates, pick_key_certificate
    from cleanroom.errors import CertificateError

    def run(data: bytes) -> object:
        table = ct.parse_cert_table(data)
        key = table.key_certificate()
        if key is not None:
            with contextlib.suppress(CertificateError):
                pick_key_certificate(load_certificates(key))
        return len(table.entries)

    def table(certs: list[tuple[object, bytes]], padding: int) -> Seed:
        offset = ct.ENTRY_SIZE * (len(certs) + 1)
        head, blobs, fields = b"", b"", []
        for index, (guid, blob) in enumerate(certs):
            head += guid.bytes_le + struct.pack("<II", offset + len(blobs), len(blob))  # type: ignore[attr-defined]
            fields += [(index * ct.ENTRY_SIZE + ct.OFF_ENTRY_OFFSET, 4),
                       (index * ct.ENTRY_SIZE + ct.OFF_ENTRY_LENGTH, 4)]
            blobs += blob
        return Seed(head + bytes(ct.ENTRY_SIZE) + blobs + bytes(padding), tuple(fields))

    trust = ROOT / "cleanroom" / "attestation" / "trust"
    ark = (trust / "amd_milan_ark.pem").read_bytes()
    ask = (trust / "amd_milan_ask.pem").read_bytes()
    vcek = (VECTORS / "snp" / "milan_v2_vcek_oak_vcek.pem").read_bytes()
    vlek = (VECTORS / "snp" / "milan_v2_vlek_aws_constellation_vlek.pem").read_bytes()
    seeds = (table([(ct.GUID_ARK, ark), (ct.GUID_ASK, ask), (ct.GUID_VCEK, vcek)], 0),
             table([(ct.GUID_VLEK, vlek)], 512), table([], 0))
    tokens = (*(g.bytes_le for g in ct.GUID_NAMES), bytes(24))
    return Target("certtable", seeds, run, tokens, max_len=ct.MAX_TABLE_SIZE + 64)


COLLATERAL_KINDS = ("tcb_info", "qe_identity", "tcb_signing_chain", "pck_crl", "root_crl")


def collateral_target() -> Target:
    from cleanroom.attestation.abi import tdx_collateral as pcs

    parsers: list[Callable[[bytes], object]] = [
        pcs.parse_tcb_info, pcs.parse_qe_identity, pcs.parse_tcb_signing_chain,
        lambda d: pcs.parse_crl(d, "pck_crl"), lambda d: pcs.parse_crl(d, "root_crl")]

    def run(data: bytes) -> object:
        if not data:
            return None
        return parsers[data[0] % len(parsers)](data[1:])

    folder = VECTORS / "tdx" / "dcap-qvl" / "collateral-2025-03"
    docs = [(folder / "tcb_info.json").read_bytes(), (folder / "qe_identity.json").read_bytes(),
            (folder / "tcb_signing_chain.pem").read_bytes(),
            _hex_file(VECTORS / "tdx" / "dcap-qvl" / "pck_crl-2026-10-08.hex"),
            _hex_file(VECTORS / "tdx" / "dcap-qvl" / "root_crl-2026-02-26.hex")]
    seeds = tuple(Seed(bytes([kind]) + doc) for kind, doc in enumerate(docs))
    tokens = (b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"-1", b"1e999",
              b"99999999999999999999", b'"\\u0000"', b"[" * 64, b'"tcbLevels"', b'"tcb"',
              b'"isvsvn"', b'"svn"', b'"signature"', b'"2025-13-45T99:99:99Z"', b"\xff\xfe",
              b"-----BEGIN X509 CRL-----", b"-----BEGIN CERTIFICATE-----")
    return Target("collateral", seeds, run, tokens, max_len=pcs.MAX_DOCUMENT_SIZE + 2)


BUILDERS: dict[str, Callable[[], Target]] = {
    "snp": snp_target, "tdx": tdx_target, "certtable": certtable_target,
    "collateral": collateral_target}


# --------------------------------------------------------------------------- the mutate engine

INTERESTING = (0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x20, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x400,
               0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


class Mutator:
    """Structure-aware byte mutations of a seed (deterministic for a given ``rng``)."""

    def __init__(self, rng: random.Random, tokens: tuple[bytes, ...], max_len: int) -> None:
        self.rng, self.tokens, self.max_len = rng, tokens, max_len

    def mutate(self, seed: Seed, other: Seed) -> bytes:
        buf = bytearray(seed.data)
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
            self._one(buf, seed, other)
        return bytes(buf[:self.max_len])

    def _one(self, buf: bytearray, seed: Seed, other: Seed) -> None:
        rng = self.rng
        op = rng.randrange(10)
        if not buf:
            buf.extend(rng.randbytes(rng.randrange(1, 64)))
            return
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op in (2, 3):  # an interesting value in a length/type field (or anywhere)
            offset, width = rng.choice(seed.fields) if seed.fields and op == 2 \
                else (pos, rng.choice((1, 2, 4)))
            if offset + width <= len(buf):
                value = rng.choice((*INTERESTING, len(buf), len(buf) - offset,
                                    rng.getrandbits(8 * width)))
                value &= (1 << (8 * width)) - 1
                buf[offset:offset + width] = value.to_bytes(width, "little")
        elif op == 4:
            del buf[pos:pos + rng.choice((1, 2, 4, 16, 64, 512))]
        elif op == 5:
            buf[pos:pos] = rng.randbytes(rng.choice((1, 2, 4, 16, 64)))
        elif op == 6:
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 7:
            start = rng.randrange(len(buf))
            chunk = buf[start:start + rng.choice((4, 16, 64, 256))]
            buf[pos:pos] = chunk
        elif op == 8 and other.data:  # splice
            cut = rng.randrange(len(other.data))
            buf[pos:] = other.data[cut:cut + rng.randrange(1, 1024)]
        elif self.tokens:
            token = rng.choice(self.tokens)
            if rng.random() < 0.5:
                buf[pos:pos] = token
            else:
                buf[pos:pos + len(token)] = token


@dataclass
class Stats:
    target: str
    engine: str
    execs: int = 0
    seconds: float = 0.0
    exceptions: dict[str, int] = field(default_factory=dict)
    parsed: int = 0
    crashes: list[str] = field(default_factory=list)  # "<type>: <message> (saved to ...)"

    def row(self) -> list[str]:
        rate = self.execs / self.seconds if self.seconds else 0.0
        return [self.target, self.engine, f"{self.execs:,}", f"{self.seconds:.1f}",
                f"{rate:,.0f}", str(len(self.exceptions)), str(len(self.crashes))]


def _signature(exc: BaseException) -> str:
    """Exception type plus the field it names: a new signature means a new path."""
    where = getattr(exc, "field", None) or re.sub(r"\d+", "#", str(exc))[:48]
    return f"{type(exc).__name__}:{where}"


def one_input(target: Target, data: bytes, stats: Stats, crash_dir: Path) -> str | None:
    """Run one input; count it; save and record it if it crashed. Returns its outcome."""
    from cleanroom.errors import CleanroomError

    stats.execs += 1
    try:
        target.run(data)
    except CleanroomError as exc:
        name = type(exc).__name__
        stats.exceptions[name] = stats.exceptions.get(name, 0) + 1
        return _signature(exc)
    except Exception as exc:  # noqa: BLE001 - that is exactly what a fuzzer looks for
        digest = hashlib.sha256(data).hexdigest()[:16]
        crash_dir.mkdir(parents=True, exist_ok=True)
        path = crash_dir / f"{target.name}-{digest}.bin"
        path.write_bytes(data)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        stats.crashes.append(f"{type(exc).__name__}: {exc} at {Path(where.filename).name}:"
                             f"{where.lineno} (input saved to {path})")
        return "crash"
    stats.parsed += 1
    return "ok"


def run_mutate(target: Target, execs: int, seed: int, crash_dir: Path) -> Stats:
    rng = random.Random(seed)
    mutator = Mutator(rng, target.tokens, target.max_len)
    corpus = list(target.seeds)
    seen: set[str] = set()
    stats = Stats(target.name, "mutate")
    start = time.perf_counter()
    for item in corpus:
        one_input(target, item.data, stats, crash_dir)
    while stats.execs < execs:
        base = rng.choice(corpus)
        data = mutator.mutate(base, rng.choice(corpus))
        outcome = one_input(target, data, stats, crash_dir)
        key = outcome if outcome != "ok" else "ok:" + hashlib.sha256(data[:64]).hexdigest()[:8]
        if outcome and outcome != "crash" and key not in seen:
            seen.add(key)
            entry = Seed(data, base.fields)
            if len(corpus) < MAX_CORPUS:
                corpus.append(entry)
            else:
                corpus[rng.randrange(len(target.seeds), MAX_CORPUS)] = entry
    stats.seconds = time.perf_counter() - start
    return stats


# --------------------------------------------------------------------------- the atheris engine


def atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _atheris_worker(name: str, execs: int, seed: int, out: Path, crash_dir: Path) -> None:
    """One target under libFuzzer, in its own process (libFuzzer owns the process)."""
    import atheris

    with atheris.instrument_imports(include=["cleanroom.attestation", "cleanroom.errors"]):
        target = BUILDERS[name]()
    stats = Stats(name, "atheris")
    start = time.perf_counter()

    def save() -> None:
        stats.seconds = time.perf_counter() - start
        out.write_text(json.dumps({"execs": stats.execs, "seconds": stats.seconds,
                                   "exceptions": stats.exceptions, "parsed": stats.parsed,
                                   "crashes": stats.crashes}))

    def test_one_input(data: bytes) -> None:
        one_input(target, data, stats, crash_dir)
        if stats.execs % 20_000 == 0:
            save()
        if stats.execs >= execs:
            save()
            os._exit(0)

    corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
    for index, item in enumerate(target.seeds):
        (corpus / f"seed-{index}").write_bytes(item.data)
    dictionary = corpus.parent / f"{corpus.name}.dict"
    dictionary.write_text("".join('"' + "".join(f"\\x{b:02x}" for b in token) + '"\n'
                                  for token in target.tokens))
    argv = [sys.argv[0], "-runs=-1", f"-seed={seed or 1}", f"-max_len={target.max_len}",
            "-rss_limit_mb=4096", "-timeout=30", "-print_final_stats=0",
            *([f"-dict={dictionary}"] if target.tokens else []), str(corpus)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def run_atheris(name: str, execs: int, seed: int, crash_dir: Path) -> Stats:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stats.json"
        cmd = [sys.executable, "-m", "benchmarks.fuzz", "--worker", name, "--execs", str(execs),
               "--seed", str(seed), "--stats-out", str(out), "--crash-dir", str(crash_dir)]
        log = Path(tmp) / "libfuzzer.log"
        with open(log, "wb") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False,
                                  cwd=ROOT)
        stats = Stats(name, "atheris")
        if out.exists():
            raw = json.loads(out.read_text())
            stats.execs, stats.seconds = raw["execs"], raw["seconds"]
            stats.exceptions, stats.parsed, stats.crashes = \
                raw["exceptions"], raw["parsed"], raw["crashes"]
        if proc.returncode != 0 or stats.execs < execs:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            stats.crashes.append(f"libFuzzer worker exited {proc.returncode} after "
                                 f"{stats.execs} execs: " + " | ".join(tail))
        return stats


# --------------------------------------------------------------------------- main


def fuzz(name: str, execs: int, *, engine: str = "mutate", seed: int = 0,
         crash_dir: Path | None = None) -> Stats:
    """Fuzz one target for ``execs`` inputs with ``engine`` ('mutate' or 'atheris')."""
    crash_dir = crash_dir or Path(tempfile.gettempdir()) / "cleanroom-fuzz-crashes"
    if engine == "atheris":
        return run_atheris(name, execs, seed, crash_dir)
    return run_mutate(BUILDERS[name](), execs, seed, crash_dir)


def print_table(rows: list[Stats]) -> None:
    head = ["target", "engine", "execs", "seconds", "execs/s", "exception types", "crashes"]
    table = [head] + [s.row() for s in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for index, row in enumerate(table):
        print("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    for stats in rows:
        kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.exceptions.items()))
        print(f"{stats.target}: {stats.parsed:,} inputs parsed; refused with {kinds or '-'}")
        for crash in stats.crashes[:10]:
            print(f"  CRASH {crash}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--execs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash-dir", type=Path, default=None)
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--stats-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Mutated certificates trip cryptography's deprecation warnings (e.g. a negative serial);
    # they are expected here and would drown the table.
    warnings.filterwarnings("ignore", message=".*serial number.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    crash_dir = args.crash_dir or Path(tempfile.gettempdir()) / "cleanroom-fuzz-crashes"
    if args.worker:
        _atheris_worker(args.worker, args.execs, args.seed, args.stats_out, crash_dir)
        return 0
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if atheris_available() else "mutate"
    elif engine == "atheris" and not atheris_available():
        print("atheris is not installed: pip install -e .[fuzz] (or use --engine mutate)")
        return 2
    names = TARGETS if args.target == "all" else (args.target,)
    rows = []
    for name in names:
        rows.append(fuzz(name, args.execs, engine=engine, seed=args.seed, crash_dir=crash_dir))
    print_table(rows)
    return 1 if any(s.crashes for s in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
