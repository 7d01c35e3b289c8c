"""Importable ClientApp factories for the in-process Grid tests (a spawned site process must
import them)."""

from __future__ import annotations

import os
import threading
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

RUNNING = {"now": 0, "most": 0}
_LOCK = threading.Lock()


def echo_app(delay: float = 0.0) -> ClientApp:
    """Replies with its node id, partition id and process id; counts concurrent calls."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, ctx: Context) -> Message:
        with _LOCK:
            RUNNING["now"] += 1
            RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
        try:
            time.sleep(delay)
            if msg.content.config_records.get("config", {}).get("fail"):
                raise RuntimeError("asked to fail")
            return Message(RecordDict({"m": MetricRecord({
                "node": ctx.node_id, "pid": os.getpid(),
                "partition": int(ctx.node_config["partition-id"])})}), reply_to=msg)
        finally:
            with _LOCK:
                RUNNING["now"] -= 1

    return app
