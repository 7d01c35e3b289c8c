"""Loading pydantic-validated configuration files (TOML or JSON) with clear, typed errors.

Used for attestation policies, site and coordinator configuration: a missing file, bad syntax
or a schema violation becomes one :class:`ConfigError` naming the file and every bad field.
Every file is read with a hard cap (:func:`read_bounded`): a huge or endless file (a 100 MB
policy, ``/dev/urandom``) is refused after at most ``limit + 1`` bytes.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from cleanroom.errors import CleanroomError, ConfigError

M = TypeVar("M", bound=BaseModel)

MAX_CONFIG_BYTES = 1024 * 1024  # configuration and policy files larger than this are refused


def read_bounded(path: Path, limit: int, *, what: str = "",
                 error: type[CleanroomError] = ConfigError) -> bytes:
    """The bytes of ``path``, refused (``error``) when it holds more than ``limit`` bytes.

    Reads at most ``limit + 1`` bytes from the open file, so a huge file or an endless device
    costs no more than that; never ``Path.read_bytes()`` on a path someone else chose.
    ``what`` prefixes the message (``"policy"`` -> ``"policy /x: file not found"``).
    """
    label = f"{what} {path}" if what else str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except IsADirectoryError:
        raise error(f"{label}: is a folder, expect a file") from None
    except OSError as exc:
        raise error(f"{label}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{label}: larger than {limit} bytes (refused unread)")
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def read_document(path: Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (anything else) document into a dict (bounded)."""
    data = read_bounded(path, MAX_CONFIG_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    try:
        if path.suffix.lower() == ".toml":
            doc: Any = tomllib.loads(text)
        else:
            doc = json.loads(text)
    except (ValueError, RecursionError) as exc:  # TOML/JSON decode errors are ValueErrors
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a table/object")
    return doc


def load_model(model: type[M], path: Path, **context: Any) -> M:
    """Validate the document at ``path`` against ``model``; ``context`` reaches validators."""
    doc = read_document(Path(path))
    try:
        return model.model_validate(doc, context={"base_dir": Path(path).parent, **context})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None


def parse_model(model: type[M], data: dict[str, Any], source: str = "input") -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def _hex_to_bytes(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0x")
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError("not a hex string") from None
    return value


def hex_bytes(size: int | None = None) -> Any:
    """A bytes field written as hex in files; ``size`` (bytes) is enforced when given."""

    def check(value: Any) -> Any:
        value = _hex_to_bytes(value)
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError("expected a hex string")
        if size is not None and len(value) != size:
            raise ValueError(f"expected {size} bytes ({2 * size} hex digits), got {len(value)}")
        return bytes(value)

    return Annotated[bytes, BeforeValidator(check), PlainSerializer(lambda b: b.hex(),
                                                                    return_type=str)]


class Section(BaseModel):
    """A configuration section: frozen, unknown keys refused (a typo never goes unnoticed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in a config file are relative to that file's folder (a list of paths:
    each of them)."""
    if isinstance(value, list):
        return [resolve_path(v, info) for v in value]
    base = (info.context or {}).get("base_dir")
    if value is not None and base is not None and not value.is_absolute():
        return (Path(base) / value).resolve()
    return value


def paths(*fields: str) -> Any:
    """A field validator resolving the named path fields against the config file's folder."""
    return field_validator(*fields)(classmethod(lambda cls, v, info: resolve_path(v, info)))
