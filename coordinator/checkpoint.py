"""Round checkpoints of a run: the global model and the server optimiser's state after each
round, written crash-safe, so a run that dies at round 40 of 50 resumes at round 41.

A checkpoint is two files in ``DIR``: ``checkpoint.npz`` (the global model under ``model/``, the
inner strategy's numpy state under ``state/``, e.g. FedAdam's moments ``m_t``/``v_t``) and
``checkpoint.json`` (run id, completed round, planned rounds, SHA-256 of the npz and of the
model, plus whatever the caller needs to rebuild the run, e.g. the report entries so far).
Both are written with :func:`cleanroom.fsutil.atomic_write`, the npz first, so the json always
names a complete npz; the digest is checked on load. Only the aggregated global model is
written (the coordinator's product, as ``final_model.npz`` is): never a site's update.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from cleanroom.errors import CleanroomError
from cleanroom.fsutil import atomic_write, atomic_write_with
from cleanroom.protocol.arrays import arrays_digest

CHECKPOINT_NPZ = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"
ROUNDS_JSONL = "rounds.jsonl"  # the report entries so far, one line per round (append-only)
PREVIOUS = ".prev"  # suffix of the checkpoint before the latest
SKIPPED_STATE = frozenset({"current_arrays"})  # re-set from the global model every round
LIST_PREFIX = "#"  # state/<name>/#<i>: the i-th array of a list attribute


class CheckpointError(CleanroomError):
    """A checkpoint is missing, torn, tampered with or does not fit the run."""


@dataclass
class Checkpoint:
    run_id: str
    round: int  # rounds completed
    rounds: int  # rounds planned
    model: OrderedDict[str, np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of checkpoint.npz, as named in the round receipt (set on load)
    audit_head: str = ""  # head of the audit chain it was checked against (load_resumable)


def strategy_state(inner: Strategy) -> dict[str, Any]:
    """The numpy state a server optimiser keeps between rounds: arrays, and dicts or lists of
    arrays (FedAdam's ``m_t``/``v_t``, FedAvgM's ``momentum_vector``...)."""
    state: dict[str, Any] = {}
    for name, value in vars(inner).items():
        if name in SKIPPED_STATE:
            continue
        if isinstance(value, np.ndarray):
            state[name] = value
        elif isinstance(value, dict) and value and all(
                isinstance(v, np.ndarray) for v in value.values()):
            state[name] = dict(value)
        elif isinstance(value, (list, tuple)) and value and all(
                isinstance(v, np.ndarray) for v in value):
            state[name] = {f"{LIST_PREFIX}{i}": v for i, v in enumerate(value)}
    return state


def _decode_state(value: Any) -> Any:
    if isinstance(value, dict) and value and all(k.startswith(LIST_PREFIX) for k in value):
        return [value[f"{LIST_PREFIX}{i}"] for i in range(len(value))]
    return value


def restore_strategy_state(inner: Strategy, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if not hasattr(inner, name):
            raise CheckpointError(f"the checkpoint holds state {name!r} that strategy "
                                  f"{type(inner).__name__} does not have")
        setattr(inner, name, _decode_state(value))


def _npz_arrays(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in ckpt.model.items()}
    for name, value in ckpt.state.items():
        if isinstance(value, dict):
            arrays.update({f"state/{name}/{k}": v for k, v in value.items()})
        else:
            arrays[f"state/{name}"] = value
    return arrays


def append_round(directory: Path, entry: dict[str, Any]) -> None:
    """Append one round's report entry (fsync'd); O(1) per round, unlike rewriting them all."""
    path = Path(directory) / ROUNDS_JSONL
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_rounds(directory: Path, entries: list[dict[str, Any]]) -> None:
    """Start ``directory``'s round entries afresh (a resumed run's new folder)."""
    atomic_write(Path(directory) / ROUNDS_JSONL, b"".join(
        json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries))


def _read_rounds(directory: Path, count: int) -> list[dict[str, Any]]:
    path = Path(directory) / ROUNDS_JSONL
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc.strerror})") from None
    if len(lines) < count:
        raise CheckpointError(f"{path} holds {len(lines)} rounds, the checkpoint names {count}")
    try:
        return [json.loads(line) for line in lines[:count]]  # later lines: after the crash
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad line ({exc})") from None


def write_checkpoint(directory: Path, ckpt: Checkpoint) -> str:
    """Write ``ckpt`` crash-safe into ``directory``; returns the npz's SHA-256. The report
    entries of the rounds so far are in ``rounds.jsonl`` (:func:`append_round`), of which
    the checkpoint names how many belong to it."""
    directory = Path(directory)
    if (directory / CHECKPOINT_JSON).exists():  # keep the last one: a crash between this
        for name in (CHECKPOINT_JSON, CHECKPOINT_NPZ):  # write and the round's receipt
            if (directory / name).exists():  # leaves the receipted one to resume from
                os.replace(directory / name, directory / (name + PREVIOUS))
    # streamed into the file (a bytes object of it would be the model and the strategy's
    # state again, up to three times while it grew)
    digest = atomic_write_with(directory / CHECKPOINT_NPZ,
                               lambda fh: np.savez(fh, **_npz_arrays(ckpt)))
    atomic_write(Path(directory) / CHECKPOINT_JSON, json.dumps({
        "format": "cleanroom-fl/checkpoint/v1", "run_id": ckpt.run_id, "round": ckpt.round,
        "rounds": ckpt.rounds, "npz_sha256": digest, "report_rounds": ckpt.round,
        "model_sha256": arrays_digest(ckpt.model), "written_at": time.time(),
        "state_names": sorted(ckpt.state), "meta": ckpt.meta}, indent=1).encode())
    return digest


def load_checkpoint(directory: Path, *, previous: bool = False) -> Checkpoint:
    """Read and check a checkpoint (typed errors naming what is wrong); ``previous``: the one
    before the latest."""
    directory = Path(directory)
    suffix = PREVIOUS if previous else ""
    try:
        head = json.loads((directory / (CHECKPOINT_JSON + suffix)).read_text())
        data = (directory / (CHECKPOINT_NPZ + suffix)).read_bytes()
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint in {directory}: {Path(exc.filename).name} is "
                              "missing (a run writes one after each completed round)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / CHECKPOINT_JSON}: unreadable ({exc})") from None
    if not isinstance(head, dict) or head.get("format") != "cleanroom-fl/checkpoint/v1":
        raise CheckpointError(f"{directory / CHECKPOINT_JSON}: not a Cleanroom FL checkpoint")
    if hashlib.sha256(data).hexdigest() != head.get("npz_sha256"):
        raise CheckpointError(f"{directory / CHECKPOINT_NPZ} does not match the SHA-256 that "
                              f"{CHECKPOINT_JSON} names: altered or from another round")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            items = {name: npz[name] for name in npz.files}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory / CHECKPOINT_NPZ}: unreadable ({exc})") from None
    model: OrderedDict[str, np.ndarray] = OrderedDict(
        (k.removeprefix("model/"), v) for k, v in items.items() if k.startswith("model/"))
    state: dict[str, Any] = {}
    for key, value in items.items():
        if not key.startswith("state/"):
            continue
        parts = key.split("/", 2)
        if len(parts) == 3:
            state.setdefault(parts[1], {})[parts[2]] = value
        else:
            state[parts[1]] = value
    if arrays_digest(model) != head.get("model_sha256"):
        raise CheckpointError(f"{directory / CHECKPOINT_NPZ}: model digest mismatch")
    meta = dict(head.get("meta") or {})
    if "report_rounds" in head:
        meta["report_rounds"] = _read_rounds(directory, int(head["report_rounds"]))
    try:
        return Checkpoint(run_id=str(head["run_id"]), round=int(head["round"]),
                          rounds=int(head["rounds"]), model=model, state=state, meta=meta,
                          sha256=str(head["npz_sha256"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CHECKPOINT_JSON}: missing or bad field "
                              f"{exc}") from None


def _last_receipt(audit_path: Path) -> tuple[dict[str, Any] | None, str]:
    """Verify the run's audit chain; its last round receipt (None if none) and its head."""
    from cleanroom.coordinator.audit import verify_chain

    result = verify_chain(audit_path)
    if not result.ok:
        raise CheckpointError(f"{audit_path}: the run's audit chain is broken at entry "
                              f"{result.first_bad} ({result.reason}); not resuming from it")
    last: dict[str, Any] | None = None
    for line in Path(audit_path).read_bytes().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "round-receipt":
            last = entry.get("body") or {}
    return last, result.head


def _named_by(ckpt: Checkpoint, receipt: dict[str, Any] | None) -> bool:
    return receipt is not None and receipt.get("checkpoint_sha256") == ckpt.sha256 and \
        int(receipt.get("round", -1)) == ckpt.round


def _not_named(ckpt: Checkpoint, audit_path: Path) -> CheckpointError:
    return CheckpointError(f"the checkpoint (round {ckpt.round}, SHA-256 {ckpt.sha256[:16]}...) "
                           f"is not the one the last signed round receipt of {audit_path} names")


def check_against_audit(ckpt: Checkpoint, audit_path: Path) -> str:
    """The audit chain that recorded ``ckpt`` must be intact and its last round receipt must
    name this very checkpoint (so a swapped or edited checkpoint, or one whose round was never
    receipted, is not resumed). Returns the chain's head."""
    receipt, head = _last_receipt(audit_path)
    if not _named_by(ckpt, receipt):
        raise _not_named(ckpt, audit_path)
    return head


def load_resumable(directory: Path, audit_path: Path) -> Checkpoint:
    """The latest checkpoint that the run's signed audit chain names (the one before it if the
    coordinator died between writing a checkpoint and receipting its round), with
    ``audit_head`` set to the verified chain's head."""
    receipt, head = _last_receipt(audit_path)
    problem: CheckpointError | None = None
    for previous in (False, True):
        if previous and not (Path(directory) / (CHECKPOINT_JSON + PREVIOUS)).exists():
            break
        try:  # the latest may be half rotated if the coordinator died while writing it
            ckpt = load_checkpoint(directory, previous=previous)
        except CheckpointError as exc:
            problem = problem or exc
            continue
        if _named_by(ckpt, receipt):
            ckpt.audit_head = head
            return ckpt
        problem = problem or _not_named(ckpt, audit_path)
    assert problem is not None
    raise problem
