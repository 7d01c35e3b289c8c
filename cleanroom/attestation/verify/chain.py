"""Certificate-link checks shared by the SEV-SNP and TDX verifiers.

``cryptography``'s PolicyBuilder rejects AMD's and Intel's chains (RSA-PSS roots, serial 0,
missing extensions), so each link is checked with ``verify_directly_issued_by`` (signature and
issuer name) and the callers add the explicit checks (validity at a settable time, pinned
anchors). A link's answer depends only on the two certificates' bytes, so it is cached.
"""

from __future__ import annotations

import threading

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

_CACHE_SIZE = 1024
_cache: dict[tuple[bytes, bytes], bool] = {}
_lock = threading.Lock()


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` signed ``child`` and is named as its issuer (any key type)."""
    key = (der(child), der(issuer))
    with _lock:
        known = _cache.get(key)
    if known is not None:
        return known
    try:
        child.verify_directly_issued_by(issuer)
        ok = True
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        ok = False
    with _lock:
        if len(_cache) >= _CACHE_SIZE:
            _cache.clear()
        _cache[key] = ok
    return ok
