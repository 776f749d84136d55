"""Interim progress display (the full tqdm one lands with the report work)."""

from __future__ import annotations


class Progress:
    def __init__(self, total, *, enabled=None, description="", tasks_per_step=None):
        self.total = total

    def start(self, step):
        pass

    def finish(self, step, status="succeeded"):
        pass

    def close(self):
        pass
