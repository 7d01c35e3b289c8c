"""What ``cryptography`` raises for X.509 input that does not decode, beyond ValueError.

Certificates and CRLs in evidence and collateral come from hosts and are not trusted: every
parser catches these and raises a typed :class:`cleanroom.errors.CleanroomError` instead
(found by ``python -m benchmarks fuzz``).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

# Loading a certificate or CRL (a bad version number is not a ValueError).
X509_LOAD_ERRORS = (ValueError, x509.InvalidVersion)
# Reading a certificate's extensions (a duplicate extension is not a ValueError).
X509_EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)
# Reading a certificate's public key.
X509_KEY_ERRORS = (ValueError, UnsupportedAlgorithm)
