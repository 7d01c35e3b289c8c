"""Job approval: a site that requires it trains only for runs its operators approved.

Approvals live in the site's sealed store (a :class:`SealedJournal`), so they survive restarts
and cannot be forged by anyone without the enclave's sealing key.
"""

from __future__ import annotations

import time
from pathlib import Path

from cleanroom.site_agent.sealed import SealedJournal

APPROVALS_FILE = "approvals.jsonl"


class Approvals:
    def __init__(self, state_dir: Path, key: bytes) -> None:
        self.journal = SealedJournal(Path(state_dir) / APPROVALS_FILE, key, label="approvals")

    def approve(self, run_id: str, by: str = "operator") -> None:
        if not self.is_approved(run_id):
            self.journal.append({"kind": "approve", "run_id": run_id, "by": by,
                                 "at": time.time()})

    def revoke(self, run_id: str, by: str = "operator") -> None:
        self.journal.append({"kind": "revoke", "run_id": run_id, "by": by, "at": time.time()})

    def is_approved(self, run_id: str) -> bool:
        state = False
        for rec in self.journal.records():
            if rec.get("run_id") == run_id:
                state = rec.get("kind") == "approve"
        return state

    def approved_runs(self) -> list[str]:
        return sorted({r["run_id"] for r in self.journal.records()
                       if self.is_approved(r["run_id"])})
