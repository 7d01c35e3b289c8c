"""One error hierarchy for the whole project.

Every failure a caller can act on is a subclass of :class:`CleanroomError`, so the CLI and the
daemons can turn any of them into a clear message and an exit code instead of a traceback.
Attestation errors name the field that was wrong, the value found and the value expected.
"""

from __future__ import annotations


class CleanroomError(Exception):
    """Base class of every error Cleanroom FL raises on purpose."""


# --------------------------------------------------------------------------- attestation


class AttestationError(CleanroomError):
    """Base class of evidence parsing and verification errors."""


class ParseError(AttestationError):
    """Evidence bytes do not form a well-formed structure.

    ``field`` names the report/quote field that was wrong (``"VERSION"``, ``"header.tee_type"``...).
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail
        super().__init__(f"field {field}: {detail}")


class UnsupportedFormatError(ParseError):
    """The bytes are neither an SEV-SNP report nor a TDX quote, or a version we do not know."""


class CertificateError(AttestationError):
    """A certificate could not be parsed, or is not the kind of certificate expected."""


class CollateralError(AttestationError):
    """TDX collateral (TCB info, QE identity, CRLs) is malformed, unsigned or out of date."""


# --------------------------------------------------------------------------- configuration


class ConfigError(CleanroomError):
    """A configuration or policy file is missing, unreadable or invalid.

    The message names the file and, for schema errors, every field that was wrong.
    """


# --------------------------------------------------------------------------- protocol


class ProtocolError(CleanroomError):
    """A wire message is malformed, out of place, or fails a binding check."""


class EnvelopeError(ProtocolError):
    """A ciphertext envelope could not be opened (wrong key, wrong binding, tampering)."""


class UpdateRejected(ProtocolError):
    """A decrypted model update failed validation (shape, dtype, finite values, norm)."""


class SiteRefusal(CleanroomError):
    """A site refuses a piece of work; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, detail: str) -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}")


class PrivacyBudgetExceeded(SiteRefusal):
    """Training would take the site past its (epsilon, delta) budget."""

    def __init__(self, detail: str) -> None:
        super().__init__("privacy-budget", detail)


class LedgerError(CleanroomError):
    """The sealed privacy ledger is unreadable, tampered with, or sealed under another key."""


class AuditChainError(CleanroomError):
    """The audit chain is malformed or fails verification; ``index`` is the first bad entry."""

    def __init__(self, index: int | None, detail: str) -> None:
        self.index = index
        self.detail = detail
        where = f"entry {index}" if index is not None else "audit log"
        super().__init__(f"{where}: {detail}")


# --------------------------------------------------------------------------- secure aggregation


class SecAggError(ProtocolError):
    """Secure aggregation cannot go on; ``code`` is a stable machine-readable reason.

    Subclasses say whose fault it is: bad parameters, a message out of order, a malformed
    message, a site's deliberate refusal, too few survivors, or a reconstruction that does not
    match its commitments. None of them ever comes with a (wrong) aggregate.
    """

    default_code = "secagg"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        self.code = code or self.default_code
        self.detail = detail
        super().__init__(f"{self.code}: {detail}")


class SecAggConfigError(SecAggError):
    """Secure-aggregation parameters are unsafe or inconsistent (threshold, modulus, sizes)."""

    default_code = "secagg-config"


class SecAggStageError(SecAggError):
    """A stage was called out of order, twice, or after the participant aborted."""

    default_code = "secagg-stage"


class SecAggMessageError(SecAggError):
    """A message is malformed, oversized, for another run/round/site, names an unknown or
    duplicate site, or does not match what was sent before."""

    default_code = "secagg-malformed"


class SecAggRefusal(SecAggError):
    """A site refuses a request on purpose (it would reveal an individual update)."""

    default_code = "secagg-refused"


class SecAggThresholdError(SecAggError):
    """Fewer than the threshold of sites took part: the round has no aggregate."""

    default_code = "secagg-below-threshold"


class SecAggIntegrityError(SecAggError):
    """A reconstructed secret does not match its commitment, or the unmasked sum is out of
    range (a site dealt inconsistent shares or sent an out-of-range masked input)."""

    default_code = "secagg-integrity"


# --------------------------------------------------------------------------- tasks and data


class TaskError(SiteRefusal, ValueError):
    """A task cannot be loaded, is malformed, or its code did something the site refuses.

    ``code`` is stable and machine-readable (``task-unknown``, ``task-invalid``,
    ``task-symlink``, ``task-model``, ``task-loss``, ``task-tampered``...), so a site can return
    it to the coordinator as a quarantine reason. Also a ``ValueError``: a bad ``Task(...)``
    definition is bad input.
    """


class DatasetError(SiteRefusal):
    """The site's data room refuses: an unknown or changed dataset, or a field it will not serve.

    Codes: ``dataset-unknown``, ``dataset-exists``, ``dataset-unreadable``, ``dataset-changed``,
    ``dataset-invalid``, ``column-unknown``, ``field-missing``, ``field-identifying``,
    ``field-type``. Messages name datasets, files and columns, never a value of a row.
    """
