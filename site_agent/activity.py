"""The site's activity log: what it was asked and what it did, sealed, for its own operators.

Shown by the site API (``/status``) and ``cleanroom site status``. Events carry ids, digests
and epsilon, never data or keys.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cleanroom.site_agent.sealed import SealedJournal

ACTIVITY_FILE = "activity.jsonl"


class Activity:
    def __init__(self, state_dir: Path, key: bytes) -> None:
        self.journal = SealedJournal(Path(state_dir) / ACTIVITY_FILE, key, label="activity",
                                     durable=False)

    def record(self, event: str, run_id: str, round: int, **detail: Any) -> None:
        self.journal.append({"at": time.time(), "event": event, "run_id": run_id,
                             "round": round, **detail})

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.journal.records()[-limit:]
