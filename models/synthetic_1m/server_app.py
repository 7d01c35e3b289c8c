"""The ServerApp of this built-in task: the coordinator's confidential run
(:mod:`cleanroom.coordinator.serverapp`). Flower resolves ``app`` statically: it is assigned."""

from cleanroom.coordinator import serverapp as _impl

app = _impl.app
