"""Job approval: a (run, task digest, epsilon) triple a site's operators approved.

A site that requires approval trains a run only for the task and up to the epsilon its
operators approved for that run; any site runs a task outside its policy's list only for a
run approved with it. Approvals live in the site's sealed store (a :class:`SealedJournal`),
so they survive restarts and cannot be forged without the enclave's sealing key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cleanroom.protocol.wire import HexDigest
from cleanroom.site_agent.sealed import SealedJournal

APPROVALS_FILE = "approvals.jsonl"
RunId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]


class ApprovalRequest(BaseModel):
    """What an operator approves (CLI and API body; strict: no coercion)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    run_id: RunId
    task_digest: HexDigest
    epsilon: float = Field(gt=0, le=1000, description="the most this run may spend here")


@dataclass(frozen=True)
class Approval:
    run_id: str
    task_digest: str
    epsilon: float
    by: str
    at: float


class Approvals:
    def __init__(self, state_dir: Path, key: bytes) -> None:
        self.journal = SealedJournal(Path(state_dir) / APPROVALS_FILE, key, label="approvals")

    def approve(self, request: ApprovalRequest, by: str = "operator") -> Approval:
        self.journal.append({"kind": "approve", "run_id": request.run_id,
                             "task_digest": request.task_digest, "epsilon": request.epsilon,
                             "by": by, "at": time.time()})
        return Approval(request.run_id, request.task_digest, request.epsilon, by, time.time())

    def revoke(self, run_id: str, by: str = "operator") -> None:
        self.journal.append({"kind": "revoke", "run_id": run_id, "by": by, "at": time.time()})

    def current(self) -> dict[str, Approval]:
        """The approval in force per run (the latest approve, unless revoked after it)."""
        state: dict[str, Approval] = {}
        for rec in self.journal.records():
            run_id = rec.get("run_id")
            if rec.get("kind") == "approve" and isinstance(run_id, str):
                state[run_id] = Approval(run_id, str(rec["task_digest"]),
                                         float(rec["epsilon"]), str(rec.get("by", "")),
                                         float(rec.get("at", 0.0)))
            elif rec.get("kind") == "revoke":
                state.pop(str(run_id), None)
        return state

    def for_run(self, run_id: str) -> Approval | None:
        return self.current().get(run_id)

    def approved_runs(self) -> list[str]:
        return sorted(self.current())
