"""Consortium PKI for deployments: a CA, the SuperLink's TLS certificate, SuperNode auth keys.

Flower 1.41 facts this follows (docs/notes/flower-deployment.md): the SuperLink needs a PEM CA,
certificate and key, with SANs for the address it serves; SuperNode authentication keys are
NIST-curve EC keys, the private key in OpenSSH format, the public key registered as an OpenSSH
one-liner, and the SuperLink hands the ServerApp each node's key as PEM SubjectPublicKeyInfo
(which is what a site binds into its attestation).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cleanroom.errors import ConfigError
from cleanroom.fsutil import write_private

CA_DAYS = 5 * 365
SERVER_DAYS = 365


def _name(cn: str, org: str = "Cleanroom FL consortium") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                     hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """TLS server certificate for the SuperLink, with a SAN per host (IP or DNS name)."""
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


@dataclass(frozen=True)
class NodePublicKey:
    """A SuperNode auth public key in the two encodings Flower uses."""

    openssh: bytes  # what `flwr supernode register` reads
    spki_pem: bytes  # what the SuperLink returns in NodeInfo.public_key (and sites bind)

    @classmethod
    def from_key(cls, key: ec.EllipticCurvePublicKey) -> NodePublicKey:
        return cls(openssh=key.public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH),
                   spki_pem=key.public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo))

    @classmethod
    def load(cls, path: Path) -> NodePublicKey:
        """Read an OpenSSH one-liner or a PEM public key (as a hospital might send either)."""
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read node public key {path}: {exc.strerror}") from None
        try:
            if data.startswith(b"-----BEGIN"):
                key = serialization.load_pem_public_key(data)
            else:
                key = serialization.load_ssh_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not an OpenSSH or PEM public key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{path}: node keys must be NIST-curve EC keys (Flower node auth)")
        return cls.from_key(key)

    @property
    def identity(self) -> bytes:
        """The node identity bound into every attestation: DER SubjectPublicKeyInfo."""
        return spki_der(self.spki_pem)


def spki_der(pem: bytes) -> bytes:
    """DER SubjectPublicKeyInfo of a PEM public key: the node identity bytes both sides bind
    (the site from its key file, the coordinator from the key the SuperLink authenticated)."""
    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a PEM public key ({exc})") from None
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_node_key(out_dir: Path, stem: str = "node_auth") -> NodePublicKey:
    """Create a SuperNode auth key where it will be used: the private key (OpenSSH, 0600)
    never leaves ``out_dir``; the public parts are written beside it for the consortium."""
    key = ec.generate_private_key(ec.SECP256R1())
    out_dir = Path(out_dir)
    write_private(out_dir / f"{stem}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = NodePublicKey.from_key(key.public_key())
    (out_dir / f"{stem}.pub").write_bytes(public.openssh + b"\n")
    (out_dir / f"{stem}.spki.pem").write_bytes(public.spki_pem)
    return public


def check_node_private_key(path: Path) -> NodePublicKey:
    """Load a SuperNode private key (OpenSSH) and return its public key; clear errors."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read node auth key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_ssh_private_key(data, None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted OpenSSH private key (Flower requires "
                          "'-----BEGIN OPENSSH PRIVATE KEY-----')") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: node keys must be NIST-curve EC keys")
    return NodePublicKey.from_key(key.public_key())
