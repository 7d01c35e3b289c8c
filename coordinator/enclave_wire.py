"""What may cross from the operator's process into the aggregator enclave, and how.

The operator's process is not trusted by the sites (that is why the aggregator runs in an
enclave of its own), so what it writes into the enclave's pipe is hostile input: never a
pickle the enclave would unpickle as is (a pickle can name any callable and run it). Calls
cross as a pickle of **data only**, read by :func:`loads`, whose unpickler resolves no
global but the few that rebuild containers and numpy arrays (:data:`ALLOWED_GLOBALS`). Our
own types are encoded by :func:`encode` as tagged plain data and rebuilt by :func:`decode`
through their validating constructors (dataclasses' ``__init__``/``__post_init__``,
pydantic's ``model_validate_json``); a Flower strategy crosses as the name of one of the
robust strategies the enclave knows and its plain constructor arguments, and is built in
there. Anything else is refused with :class:`EnclaveInputError`.

What comes back from the enclave (verdicts, evidence, aggregates) is the enclave's own output
and is read with the standard unpickler by the operator's side.

Framing (both directions): a call or an answer is one *head* message (the number of
out-of-band buffers, their sizes, then the pickle) followed by that many buffer messages.
Large values (a sealed update's ciphertext chunks, numpy arrays' data) cross as pickle
protocol 5 out-of-band buffers: written from where they are and read straight into the
objects the receiver uses, never copied into or out of a pickle (a model-sized copy fewer on
each side, per update). :func:`frame` / :func:`unframe` are the head's codec; the pipe's I/O
is in :mod:`.aggregator_enclave`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cleanroom.errors import CleanroomError

MAX_CALL_BYTES = 2**33  # 8 GiB: larger than any model this process could hold anyway
MAX_BUFFERS = 1 << 16  # out-of-band buffers in one call (a sealed update: one per MiB chunk)
OOB_BYTES = 1 << 16  # bytes values at least this large cross out of band
_COUNT = struct.Struct("<I")
_SIZE = struct.Struct("<Q")

# (module, name) the enclave's unpickler may resolve: containers and numpy arrays, nothing
# that calls code of the sender's choosing.
ALLOWED_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("builtins", "bytearray"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
})

# Flower strategies that aggregate inside the enclave (they need every update).
ROBUST_STRATEGIES = ("Krum", "MultiKrum", "Bulyan", "FedMedian", "FedTrimmedAvg")
_PLAIN = (int, float, str, bool, type(None))


class EnclaveInputError(CleanroomError):
    """Something the operator's process wrote into the enclave's pipe was refused."""


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise EnclaveInputError(f"{module}.{name} may not cross into the aggregator enclave")


def loads(data: bytes | memoryview, buffers: Iterable[Any] = ()) -> Any:
    """Unpickle data only (containers, numbers, bytes, strings, numpy arrays); ``buffers``:
    the call's out-of-band buffers, each referenced exactly once."""
    if len(data) > MAX_CALL_BYTES:
        raise EnclaveInputError(f"a call of {len(data)} bytes is larger than "
                                f"{MAX_CALL_BYTES}")
    remaining = iter(buffers)
    try:
        obj = _DataOnly(io.BytesIO(data), buffers=remaining).load()
    except EnclaveInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed pickle is one typed refusal
        raise EnclaveInputError(f"malformed call: {type(exc).__name__}: {exc}") from None
    if next(remaining, None) is not None:
        raise EnclaveInputError("malformed call: it carries buffers its pickle does not use")
    return obj


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """A call as its head (:func:`frame`) and its out-of-band buffers (views of the caller's
    own bytes and arrays: nothing large is copied)."""
    return pickled(encode(obj))


def pickled(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` (protocol 5) with its large values out of band: (head, buffers)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    return frame(data, [v.nbytes for v in views]), views


def frame(data: bytes, sizes: list[int]) -> bytes:
    """The head message: buffer count, each buffer's size, then the pickle."""
    return _COUNT.pack(len(sizes)) + b"".join(_SIZE.pack(n) for n in sizes) + data


def unframe(head: bytes) -> tuple[list[int], memoryview]:
    """(buffer sizes, pickle) of a head message; refuses a count or a total size beyond the
    limits before anything is allocated for the buffers."""
    view = memoryview(head)
    if len(view) < _COUNT.size:
        raise EnclaveInputError("malformed call: no frame header")
    (count,) = _COUNT.unpack_from(view)
    if count > MAX_BUFFERS:
        raise EnclaveInputError(f"a call with {count} buffers (at most {MAX_BUFFERS})")
    start = _COUNT.size + count * _SIZE.size
    if len(view) < start:
        raise EnclaveInputError("malformed call: its frame header is cut short")
    sizes = [_SIZE.unpack_from(view, _COUNT.size + i * _SIZE.size)[0] for i in range(count)]
    if sum(sizes) + len(view) > MAX_CALL_BYTES:
        raise EnclaveInputError(f"a call of {sum(sizes) + len(view)} bytes is larger than "
                                f"{MAX_CALL_BYTES}")
    return sizes, view[start:]


@functools.cache
def _types() -> dict[str, type]:
    """Our types that may cross, by name (imported here: both sides know them)."""
    from cleanroom.coordinator.aggregator import CentralDp, SiteSlot
    from cleanroom.coordinator.aggregator_enclave import AggregatorLaunch
    from cleanroom.protocol.payload import EnvelopeHeader, Sealed
    from cleanroom.protocol.wire import TrainPlan

    return {t.__name__: t for t in (CentralDp, SiteSlot, AggregatorLaunch, EnvelopeHeader,
                                    Sealed, TrainPlan)}


def _robust_class(name: str) -> type:
    import flwr.serverapp.strategy as strategies

    if name not in ROBUST_STRATEGIES or not hasattr(strategies, name):
        raise EnclaveInputError(f"strategy {name!r} does not run inside the aggregator "
                                f"(robust strategies: {', '.join(ROBUST_STRATEGIES)})")
    cls: type = getattr(strategies, name)
    return cls


def _strategy_args(strategy: Any) -> dict[str, Any]:
    """The plain constructor arguments of ``strategy`` (by name, from its attributes)."""
    params = inspect.signature(type(strategy).__init__).parameters
    state = vars(strategy)
    return {p: state[p] for p in params if p != "self" and p in state
            and isinstance(state[p], _PLAIN)}


def encode(obj: Any) -> Any:
    """``obj`` as tagged plain data (see :func:`decode`); large ``bytes`` are marked to
    cross out of band (they arrive as ``bytes``)."""
    if isinstance(obj, bytes):
        return pickle.PickleBuffer(obj) if len(obj) >= OOB_BYTES else obj
    types = _types()
    if isinstance(obj, BaseModel) and type(obj).__name__ in types:
        return {"$type": type(obj).__name__, "json": obj.model_dump_json()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) \
            and type(obj).__name__ in types:
        return {"$type": type(obj).__name__,
                "fields": {f.name: encode(getattr(obj, f.name))
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, Path):
        return {"$type": "Path", "value": str(obj)}
    if type(obj).__name__ in ROBUST_STRATEGIES and type(obj).__module__.startswith("flwr."):
        return {"$type": "strategy", "name": type(obj).__name__,
                "args": _strategy_args(obj)}
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, encode(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(encode(v) for v in obj)
    return obj


def decode(obj: Any, *, depth: int = 0) -> Any:
    """Rebuild what :func:`encode` tagged, through validating constructors."""
    if depth > 32:
        raise EnclaveInputError("a call nested more than 32 levels deep")
    if isinstance(obj, dict) and "$type" in obj:
        return _decode_tagged(obj, depth)
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, decode(v, depth=depth + 1)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: decode(v, depth=depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(decode(v, depth=depth + 1) for v in obj)
    return obj


def _decode_tagged(obj: dict[str, Any], depth: int) -> Any:
    tag = obj["$type"]
    try:
        if tag == "Path":
            return Path(_plain(obj["value"], str))
        if tag == "strategy":
            args = _plain(obj["args"], dict)
            if not all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in args.items()):
                raise EnclaveInputError("a strategy's arguments must be plain values")
            return _robust_class(_plain(obj["name"], str))(**args)
        cls = _types().get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise EnclaveInputError(f"type {tag!r} may not cross into the aggregator enclave")
        if issubclass(cls, BaseModel):
            return cls.model_validate_json(_plain(obj["json"], str))
        fields = _plain(obj["fields"], dict)
        build: Callable[..., Any] = cls
        return build(**{k: decode(v, depth=depth + 1) for k, v in fields.items()})
    except EnclaveInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad field is one typed refusal
        raise EnclaveInputError(f"bad {tag!r} in a call: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None


def _plain(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise EnclaveInputError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
