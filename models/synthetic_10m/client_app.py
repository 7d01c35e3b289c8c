"""The ClientApp of this built-in task: the site agent's confidential ClientApp
(:mod:`cleanroom.site_agent.clientapp`), which trains this task by its approved digest."""

from cleanroom.site_agent import clientapp as _impl

app = _impl.app
